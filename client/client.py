"""A thin, typed client: numpy in, numpy out.

    with Client("localhost:50051") as client:
        with client.start_session("basic_motions") as session:
            for frame in frames:             # frame: [timesteps, features]
                probabilities = session.step(frame)

A `State` is a dict from layer name to its parts: `{"lstm": {"h": ..., "c": ...}}`,
each part of shape [units] for one session.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from . import retries, streams, tensors
from .conversions import Outputs, State, cast, outputs_of, state_to_proto
from .errors import SeqServeError
from .retries import RetryPolicy
from .session import Session


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # for one session; -1 marks the time axis


@dataclasses.dataclass(frozen=True)
class StatePartInfo:
    layer: str
    layer_type: str
    part: str
    units: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    input: TensorInfo
    outputs: tuple[TensorInfo, ...]
    state: tuple[StatePartInfo, ...]
    outputs_per_timestep: bool
    version: int = 1

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> "ModelInfo":
        def tensor(spec: pb.TensorSpec) -> TensorInfo:
            return TensorInfo(
                spec.name, tensors.numpy_dtype(spec.dtype), tuple(spec.shape)
            )

        return cls(
            name=info.name,
            input=tensor(info.input),
            outputs=tuple(tensor(o) for o in info.outputs),
            state=tuple(
                StatePartInfo(p.layer, p.layer_type, p.part, p.units)
                for p in info.state
            ),
            outputs_per_timestep=info.outputs_per_timestep,
            version=info.version,
        )


class Client:
    """Thread-safe; one channel shared by every session made from it.

    `timeout_s` is the deadline of each attempt of a call (None: none but the
    retry policy's). `retry` says how calls that are safe to repeat are
    repeated (`retries.NO_RETRIES`: never). With `numbered_steps`, each
    session numbers its unary steps, so that a step whose reply was lost is
    retried and still applies exactly once (see `Session`).

    TLS is on with `tls=True` or any certificate given (PEM bytes):
    `root_certificates` to trust the server's (default: the system's),
    `certificate_chain` and `private_key` for a server that requires client
    certificates. `token` is sent as `authorization: Bearer <token>` on every
    call. `max_message_bytes` raises gRPC's 4 MiB limit on replies.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy = retries.DEFAULT_RETRIES,
        numbered_steps: bool = True,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        token: str | None = None,
        max_message_bytes: int | None = None,
    ):
        options = []
        if max_message_bytes is not None:
            options.append(("grpc.max_receive_message_length", max_message_bytes))
            options.append(("grpc.max_send_message_length", max_message_bytes))
        if channel is None and (tls or root_certificates or certificate_chain):
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            channel = grpc.secure_channel(target, credentials, options)
        self._channel = channel or grpc.insecure_channel(target, options)
        self._stub = pb_grpc.SequenceServiceStub(self._channel)
        self.timeout_s = timeout_s
        self.retry = retry
        self.numbered_steps = numbered_steps
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def list_models(self) -> list[ModelInfo]:
        reply = self._call(
            self._stub.ListModels, pb.ListModelsRequest(), retries.FOR_READS
        )
        return [ModelInfo.from_proto(m) for m in reply.models]

    def attach(self, session_id: str, model: str) -> "Session":
        """A handle on a live session started elsewhere (another client, or an
        import), numbering its steps from the server's count."""
        info = next((m for m in self.list_models() if m.name == model), None)
        if info is None:
            raise ValueError(f"model {model!r} is not loaded on the server")
        session = Session(self, session_id, info)
        session.sync()
        return session

    def export_session(self, session: "Session") -> bytes:
        """The session as opaque bytes for `import_session`; it stays live here."""
        request = pb.ExportSessionRequest(session_id=session.id)
        return self._call(self._stub.ExportSession, request, retries.FOR_READS).session

    def import_session(self, exported: bytes) -> "Session":
        """Creates an exported session on this server, under its own id and
        with its step number. Not idempotent (ALREADY_EXISTS once it is live)."""
        reply = self._call(
            self._stub.ImportSession, pb.ImportSessionRequest(session=exported)
        )
        session = Session(self, reply.session_id, ModelInfo.from_proto(reply.model))
        session.step_number, session.timesteps = reply.step_number, reply.timesteps
        return session

    def start_session(
        self,
        model: str,
        *,
        session_id: str = "",
        state: State | None = None,
        version: int = 0,
    ) -> "Session":
        """Starts a session from zeros, or from `state`. Not idempotent.

        `version` 0 is the model's newest; the session stays on the version it
        starts on (`session.model.version`) until it ends."""
        request = pb.StartSessionRequest(
            model=model, session_id=session_id, version=version
        )
        if state is not None:
            request.initial_state.CopyFrom(state_to_proto(state))
        reply = self._call(self._stub.StartSession, request)
        return Session(self, reply.session_id, ModelInfo.from_proto(reply.model))

    def step_many(
        self,
        sessions: Sequence["Session"],
        inputs: np.ndarray,
        *,
        reset: bool = False,
    ) -> Outputs:
        """Steps distinct sessions of one model in one message, as one batch.

        `inputs` has shape [sessions, timesteps, *features]; row i feeds
        sessions[i]. Returns outputs with a leading sessions axis. All or
        nothing: any invalid item refuses the whole request.
        """
        if not sessions:
            raise ValueError("expected at least one session")
        request = pb.StepManyRequest(
            session_ids=[s.id for s in sessions],
            inputs=tensors.to_proto(cast(inputs, sessions[0].model.input.dtype)),
            reset=reset,
        )
        reply = self._call(self._stub.StepMany, request, retries.REFUSED_UNAPPLIED)
        for session, timesteps, number in zip(
            sessions, reply.timesteps, reply.step_numbers
        ):
            session.timesteps, session.step_number = timesteps, number
        return outputs_of(reply.outputs)

    def step_stream(
        self, steps: Iterable[tuple["Session", np.ndarray]], *, numbered: bool = False
    ) -> Iterator[Outputs | SeqServeError]:
        """Sends (session, inputs) pairs on one stream; yields, in the same order,
        each step's outputs, or the typed error that refused that step (the
        stream goes on). Steps of one session apply in the order sent. `steps`
        may be a live generator; it is read on another thread as the stream
        goes.

        `numbered`: each step carries its session's next step number, and none
        applies out of order. Once a step of a session is refused, every later
        step of that session on this stream yields `StepSkippedError` without
        applying: those sent before the refusal came back are refused by the
        server, the others are not sent. That lasts until the session resyncs
        (`session.sync()`, or `session.resume_from(n)` after a restore), which
        the caller may do while the stream goes on; its steps then go out from
        `session.step_number + 1`. A refusal's error carries the number it was
        sent with (`step_number`, so `server_behind` holds on streams too).
        The stream itself is not retried: after a broken stream, resend from
        `session.step_number + 1`.
        """
        return streams.step_stream(self._stub, self._metadata, steps, numbered)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: Callable, request, retry_on: frozenset = frozenset()):
        return retries.call(
            method,
            request,
            timeout_s=self.timeout_s,
            policy=self.retry,
            retry_on=retry_on,
            metadata=self._metadata,
        )
