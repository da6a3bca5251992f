"""The gRPC servicer: decode the request, call the core, encode the reply.

Errors become statuses here and nowhere else. Unexpected ones are logged once
with their traceback; the client sees only a generic detail.
"""

import functools
import logging
import queue
import threading
import time

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from . import tensors
from .auth import caller_of, identity_of
from .core import SequenceCore
from .errors import SeqServeError, StepOutOfOrder
from .metrics import Metrics
from .models import ServedModel
from .parsing import refuse_unparsed

log = logging.getLogger(__name__)

# Steps of one stream submitted but not yet answered; past it, reading waits.
STREAM_WINDOW = 1024
# How often a waiting stream checks whether its call is still alive.
STREAM_POLL_S = 0.5
_END_OF_STREAM = object()
# Characters of an error message sent to the client. A message echoes parts of
# the request; gRPC fails a call whose status detail passes its metadata limit
# (8 KiB, percent-encoded), and the client would see RESOURCE_EXHAUSTED instead.
MAX_DETAIL_CHARS = 500


def _statuses(method):
    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            refuse_unparsed(request)
            return method(self, request, context)
        except SeqServeError as error:
            self.metrics.rejected(error.code)
            if log.isEnabledFor(logging.DEBUG):
                about = _about(self, request)
                log.debug("%s refused: %s", method.__name__, error, extra=about)
            if error.trailing_metadata:
                context.set_trailing_metadata(error.trailing_metadata)
            context.abort(error.code, _detail(error))
        except Exception:
            self.metrics.rejected(grpc.StatusCode.INTERNAL)
            log.exception(
                "unexpected error in %s", method.__name__, extra=_about(self, request)
            )
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see server log")

    return wrapper


class SequenceServicer(pb_grpc.SequenceServiceServicer):
    def __init__(self, core: SequenceCore, metrics: Metrics | None = None):
        self.core = core
        self.metrics = core.metrics if metrics is None else metrics

    @_statuses
    def ListModels(self, request, context):
        models = [model_info(m) for m in self.core.versions.all()]
        return pb.ListModelsResponse(models=models)

    @_statuses
    def StartSession(self, request, context):
        state = _state(request, "initial_state")
        caller = caller_of(context)
        session, model = self.core.start_session(
            request.model,
            request.session_id,
            state,
            request.version,
            caller.identity,
            caller.client,
        )
        return pb.StartSessionResponse(session_id=session.id, model=model_info(model))

    @_statuses
    def Step(self, request, context):
        model, future = self._submit(request, identity_of(context), context)
        return _step_reply(model, future.result())

    @_statuses
    def StepMany(self, request, context):
        inputs = tensors.decode(request.inputs, "inputs")
        model, result = self.core.step_many(
            list(request.session_ids),
            inputs,
            reset=request.reset,
            return_state=request.return_state,
            caller=identity_of(context),
            **_call_limits(context),
        )
        reply = pb.StepManyResponse(
            outputs=[tensors.encode(x) for x in result.outputs],
            timesteps=result.timesteps,
            step_numbers=result.step_numbers,
        )
        if result.state is not None:
            reply.state.CopyFrom(encode_state(model, result.state))
        return reply

    def StepStream(self, request_iterator, context):
        """Replies in request order; a refused step gets an error outcome and the
        stream goes on.

        While every step names the stream's first session, this thread reads,
        submits and answers each in turn: the steps of one session run one
        after another anyway, and a handoff to another thread per message
        would cost more than the step. From the first step of another session
        on, a reader thread submits steps as they arrive, so that the steps of
        many sessions on one stream batch together.
        """
        caller = identity_of(context)
        requests = iter(request_iterator)
        first = None
        try:
            for request in requests:
                session_id = getattr(request, "session_id", None)  # None: unparsed
                first = session_id if first is None else first
                step = self._submit_step(request, caller, context)
                if session_id != first:
                    yield from self._stream_from_reader(
                        (request, step), requests, context, caller
                    )
                    return
                yield self._outcome(request, step)
        except grpc.RpcError:
            return  # the client went away; nothing waits for the replies

    def _stream_from_reader(self, submitted, requests, context, caller):
        """Outcomes of `submitted` and then of every step a reader thread
        submits from `requests`, in order."""
        pending: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        pending.put(submitted)
        threading.Thread(
            target=self._submit_stream,
            args=(requests, pending, context, caller),
            name="stream-reader",
            daemon=True,
        ).start()
        while (item := _next(pending, context)) is not _END_OF_STREAM:
            yield self._outcome(*item)

    def _submit_stream(self, requests, pending: queue.Queue, context, caller) -> None:
        try:
            for request in requests:
                step = self._submit_step(request, caller, context)
                if not _put(pending, (request, step), context):
                    return
        except grpc.RpcError:
            pass  # the client went away; nothing waits for the replies
        finally:
            _put(pending, _END_OF_STREAM, context)

    def _submit_step(self, request, caller, context):
        """(model, future) for an accepted step, or the error that refused it."""
        try:
            return self._submit(request, caller, context)
        except Exception as error:
            return error

    def _outcome(self, request, step) -> pb.StepOutcome:
        """The reply to one stream step: `step` is (model, future) or the error
        that refused it. A refusal is counted and logged here, as `_statuses`
        does for a unary call."""
        try:
            if isinstance(step, Exception):
                raise step
            model, future = step
            return pb.StepOutcome(response=_step_reply(model, future.result()))
        except SeqServeError as error:
            self.metrics.rejected(error.code)
            if log.isEnabledFor(logging.DEBUG):
                about = _about(self, request)
                log.debug("StepStream step refused: %s", error, extra=about)
            outcome = pb.StepOutcome(error=_error(error.code, _detail(error)))
            if isinstance(error, StepOutOfOrder):
                outcome.error.expected_step_number = error.expected
            return outcome
        except Exception:
            log.exception("unexpected error in StepStream", extra=_about(self, request))
            internal = grpc.StatusCode.INTERNAL
            self.metrics.rejected(internal)
            return pb.StepOutcome(
                error=_error(internal, "internal error; see server log")
            )

    def _submit(self, request, caller, context):
        """Decodes and submits one StepRequest; raises if it is refused."""
        refuse_unparsed(request)
        return self.core.submit_step(
            request.session_id,
            tensors.decode(request.inputs, "inputs"),
            state=_state(request, "state"),
            reset=request.reset,
            return_state=request.return_state,
            caller=caller,
            step_number=request.step_number,
            **_call_limits(context),
        )

    @_statuses
    def Reset(self, request, context):
        state = _state(request, "state")
        self.core.write_state(request.session_id, state, identity_of(context))
        return pb.ResetResponse()

    @_statuses
    def GetState(self, request, context):
        model, values, timesteps, step_number = self.core.read_state(
            request.session_id, identity_of(context)
        )
        return pb.GetStateResponse(
            state=encode_state(model, values),
            timesteps=timesteps,
            step_number=step_number,
        )

    @_statuses
    def SetState(self, request, context):
        state = _state(request, "state") or []  # absent: refused as missing parts
        self.core.write_state(request.session_id, state, identity_of(context))
        return pb.SetStateResponse()

    @_statuses
    def EndSession(self, request, context):
        timesteps = self.core.end_session(request.session_id, identity_of(context))
        return pb.EndSessionResponse(timesteps=timesteps)

    @_statuses
    def ExportSession(self, request, context):
        data = self.core.export_session(request.session_id, identity_of(context))
        return pb.ExportSessionResponse(session=data)

    @_statuses
    def ImportSession(self, request, context):
        caller = caller_of(context)
        session, model = self.core.import_session(
            request.session, caller.identity, caller.client
        )
        return pb.ImportSessionResponse(
            session_id=session.id,
            model=model_info(model),
            step_number=session.step_number,
            timesteps=session.timesteps,
        )


def _call_limits(context) -> dict:
    """The call's deadline (as time.monotonic()) and whether it is over, for
    the executor to skip a step nobody waits for any more."""
    remaining_s = context.time_remaining()
    deadline_s = None if remaining_s is None else time.monotonic() + remaining_s
    return {"deadline_s": deadline_s, "cancelled": lambda: not context.is_active()}


def _next(pending: queue.Queue, context):
    """The next submitted step, or the end once the call is over for any reason
    (a cancelled call may never see the reader's end mark)."""
    while True:
        try:
            return pending.get(timeout=STREAM_POLL_S)
        except queue.Empty:
            if not context.is_active():
                return _END_OF_STREAM


def _put(pending: queue.Queue, item, context) -> bool:
    """Waits for room in the window while the call is alive; False once it is not."""
    while context.is_active():
        try:
            pending.put(item, timeout=STREAM_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _about(servicer, request) -> dict:
    """The `extra` of a log line about the request's session: `session_id` and
    `model` (empty when the session is not live); a StepMany of several
    sessions gives `session_ids` instead."""
    ids = getattr(request, "session_ids", None)
    if ids is None:
        session_id = getattr(request, "session_id", "")
        ids = [session_id] if isinstance(session_id, str) and session_id else []
    if not ids:
        return {}
    about = {"session_id": ids[0]} if len(ids) == 1 else {"session_ids": list(ids)}
    model = getattr(request, "model", "")
    if not (isinstance(model, str) and model):
        model = _live_model(servicer, ids[0])
    return about | {"model": model}


def _live_model(servicer, session_id: str) -> str:
    try:
        return servicer.core.sessions.live(session_id).model
    except SeqServeError:  # not live, malformed, or the models are still loading
        return ""


def _detail(error: SeqServeError) -> str:
    message = str(error)
    if len(message) <= MAX_DETAIL_CHARS:
        return message
    return message[: MAX_DETAIL_CHARS - 20] + " ... (shortened)"


def _error(code: grpc.StatusCode, message: str) -> pb.Error:
    return pb.Error(code=code.value[0], message=message)


def _step_reply(model: ServedModel, result) -> pb.StepResponse:
    reply = pb.StepResponse(
        outputs=[tensors.encode(x) for x in result.outputs],
        timesteps=result.timesteps,
        step_number=result.step_number,
    )
    if result.state is not None:
        reply.state.CopyFrom(encode_state(model, result.state))
    return reply


def _state(request, field: str):
    """The decoded parts of an optional State field, or None when absent."""
    if not request.HasField(field):
        return None
    return [
        (p.layer, p.part, tensors.decode(p.value, f"{field} part {p.layer}.{p.part}"))
        for p in getattr(request, field).parts
    ]


def encode_state(model: ServedModel, values) -> pb.State:
    return pb.State(
        parts=[
            pb.StatePart(layer=spec.layer, part=spec.part, value=tensors.encode(value))
            for spec, value in zip(model.state_parts, values)
        ]
    )


def model_info(model: ServedModel) -> pb.ModelInfo:
    def spec(s):
        return pb.TensorSpec(
            name=s.name, dtype=tensors.proto_dtype(s.dtype), shape=list(s.shape)
        )

    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        input=spec(model.input),
        outputs=[spec(o) for o in model.outputs],
        state=[
            pb.StatePartSpec(
                layer=p.layer, layer_type=p.layer_type, part=p.part, units=p.units
            )
            for p in model.state_parts
        ],
        outputs_per_timestep=model.outputs_per_timestep,
    )
