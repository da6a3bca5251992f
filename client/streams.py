"""One StepStream call: outcomes in the order sent, numbered steps kept in order.

The request iterator runs on gRPC's thread, the replies are read on the
caller's, in the order of one queue of what was sent: a step the client does
not send still gets its outcome in its place, at once. The end of the
requests and the end of the call each put `_END` on that queue.
"""

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from . import tensors
from .conversions import Outputs, cast, outputs_of
from .errors import (
    SeqServeError,
    StepOutOfOrderError,
    StepSkippedError,
    from_code,
    from_rpc_error,
)
from .session import Session

_END = object()


@dataclasses.dataclass
class _Sent:
    session: Session
    number: int  # 0: unnumbered
    resyncs: int  # the session's resync count when it was numbered
    skipped: StepSkippedError | None = None  # not sent, for this reason


@dataclasses.dataclass
class _Refusal:
    resyncs: int  # the session's resync count when its step was refused
    expected: int  # the number the server expects next, as far as known
    renumbered: bool = False  # numbering restarted after a resync


class _Numbering:
    """Numbers the steps of one stream. Once a numbered step of a session is
    refused, the session's later steps on this stream are not sent until it
    resyncs; then its numbers restart from its step number. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._claimed: dict[Session, int] = {}  # the last number sent
        self._refusals: dict[Session, _Refusal] = {}

    def number(self, session: Session) -> _Sent:
        resyncs = session._resyncs
        with self._lock:
            refusal = self._refusals.get(session)
            if refusal is not None and refusal.resyncs == resyncs:
                return _Sent(session, 0, resyncs, _skipped(session, refusal, 0))
            restart = refusal is not None and not refusal.renumbered
            if restart:
                refusal.renumbered = True
        # Only this (gRPC's) thread numbers: no lock needed for _claimed.
        claimed = 0 if restart else self._claimed.get(session, 0)
        self._claimed[session] = session._next_number(claimed)
        return _Sent(session, self._claimed[session], resyncs)

    def refused(self, sent: _Sent, error: SeqServeError) -> SeqServeError:
        """The error to report for a numbered step the server refused."""
        with self._lock:
            refusal = self._refusals.get(sent.session)
            if refusal is not None and refusal.resyncs == sent.resyncs:
                # Sent after the refused step: refused for its number.
                if isinstance(error, StepOutOfOrderError):
                    return _skipped(sent.session, refusal, sent.number)
                return error
            if sent.resyncs == sent.session._resyncs:  # else sent before a resync
                expected = getattr(error, "expected_step_number", 0) or sent.number
                self._refusals[sent.session] = _Refusal(sent.resyncs, expected)
        return error


def _skipped(session: Session, refusal: _Refusal, number: int) -> StepSkippedError:
    skipped = StepSkippedError(
        f"session {session.id!r}: an earlier step on this stream was refused, so "
        f"this one was not applied; the server expects step {refusal.expected}. "
        "Call session.sync() (or resume_from), then send it again",
        refusal.expected,
    )
    skipped.step_number = number or None
    return skipped


def step_stream(
    stub, metadata, steps: Iterable[tuple[Session, np.ndarray]], numbered: bool
) -> Iterator[Outputs | SeqServeError]:
    """What `Client.step_stream` yields."""
    sent: queue.SimpleQueue = queue.SimpleQueue()
    numbering = _Numbering()

    def requests():
        try:
            for session, inputs in steps:
                entry = numbering.number(session) if numbered else _Sent(session, 0, 0)
                if entry.skipped is not None:
                    sent.put(entry)
                    continue
                request = pb.StepRequest(
                    session_id=session.id,
                    inputs=tensors.to_proto(cast(inputs, session.model.input.dtype)),
                    step_number=entry.number,
                )
                sent.put(entry)
                yield request
        finally:
            sent.put(_END)

    replies = stub.StepStream(requests(), timeout=None, metadata=metadata)
    # A call that ends while `steps` waits (a live generator) ends the loop too.
    replies.add_done_callback(lambda _: sent.put(_END))
    try:
        while (entry := sent.get()) is not _END:
            if entry.skipped is not None:
                yield entry.skipped
                continue
            outcome = next(replies, None)
            if outcome is None:
                return  # the server ended the stream early
            yield _result(entry, outcome, numbering)
        for _ in replies:
            pass  # nothing is left but the call's status, raised if an error
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        replies.cancel()  # a no-op once the call is over


def _result(entry: _Sent, outcome: pb.StepOutcome, numbering: _Numbering):
    session = entry.session
    if outcome.HasField("error"):
        message = outcome.error
        error = from_code(message.code, message.message, message.expected_step_number)
        error.step_number = entry.number
        return numbering.refused(entry, error) if entry.number else error
    session.timesteps = outcome.response.timesteps
    session.step_number = outcome.response.step_number
    return outputs_of(outcome.response.outputs)
