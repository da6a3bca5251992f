"""A thin, typed client: numpy in, numpy out.

    with Client("localhost:50051") as client:
        with client.start_session("basic_motions") as session:
            for frame in frames:             # frame: [timesteps, features]
                probabilities = session.step(frame)

A `State` is a dict from layer name to its parts: `{"lstm": {"h": ..., "c": ...}}`,
each part of shape [units] for one session.
"""

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from . import retries, tensors
from .errors import (
    NotFoundError,
    SeqServeError,
    from_code,
    from_rpc_error,
)
from .retries import RetryPolicy

State = dict[str, dict[str, np.ndarray]]
Outputs = np.ndarray | tuple[np.ndarray, ...]


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
        )


class Client:
    """Thread-safe; one channel shared by every session made from it.

    `timeout_s` is the deadline of each attempt of a call (None: none but the
    retry policy's). `retry` says how calls that are safe to repeat are
    repeated (`retries.NO_RETRIES`: never). With `numbered_steps`, each
    session numbers its unary steps, so that a step whose reply was lost is
    retried and still applies exactly once (see `Session`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy = retries.DEFAULT_RETRIES,
        numbered_steps: bool = True,
        channel: grpc.Channel | None = None,
    ):
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.SequenceServiceStub(self._channel)
        self.timeout_s = timeout_s
        self.retry = retry
        self.numbered_steps = numbered_steps

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
        self, model: str, *, session_id: str = "", state: State | None = None
    ) -> "Session":
        """Starts a session from zeros, or from `state`. Not idempotent."""
        request = pb.StartSessionRequest(model=model, session_id=session_id)
        if state is not None:
            request.initial_state.CopyFrom(_state_to_proto(state))
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
            inputs=tensors.to_proto(_cast(inputs, sessions[0].model.input.dtype)),
            reset=reset,
        )
        reply = self._call(self._stub.StepMany, request, retries.REFUSED_UNAPPLIED)
        for session, timesteps, number in zip(
            sessions, reply.timesteps, reply.step_numbers
        ):
            session.timesteps, session.step_number = timesteps, number
        return _outputs(reply.outputs)

    def step_stream(
        self, steps: Iterable[tuple["Session", np.ndarray]], *, numbered: bool = False
    ) -> Iterator[Outputs | SeqServeError]:
        """Sends (session, inputs) pairs on one stream; yields, in the same order,
        each step's outputs, or the typed error that refused that step (the
        stream goes on). Steps of one session apply in the order sent.

        `numbered`: each step carries its session's next step number, so a
        refused step also refuses the later steps of its session already sent
        (StepOutOfOrderError): none applies out of order. The stream itself is
        not retried; resend from `session.step_number + 1`.
        """
        sent: queue.SimpleQueue = queue.SimpleQueue()

        def requests():
            for session, inputs in steps:
                sent.put(session)
                yield pb.StepRequest(
                    session_id=session.id,
                    inputs=tensors.to_proto(_cast(inputs, session.model.input.dtype)),
                    step_number=session._claim_number() if numbered else 0,
                )

        try:
            for outcome in self._stub.StepStream(requests(), timeout=None):
                session = sent.get()
                if outcome.HasField("error"):
                    error = outcome.error
                    session._unclaim()
                    yield from_code(
                        error.code, error.message, error.expected_step_number
                    )
                    continue
                session.timesteps = outcome.response.timesteps
                session.step_number = outcome.response.step_number
                yield _outputs(outcome.response.outputs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

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
        )


class Session:
    """One server-side session. Calls on one session apply in the order the
    server receives them: one after another when each is waited for, as here.

    With the client's `numbered_steps` (the default), `step` sends the next
    step number and retries a step whose outcome is unknown (UNAVAILABLE,
    DEADLINE_EXCEEDED, CANCELLED) or that was refused unapplied
    (RESOURCE_EXHAUSTED): the server applies it once and answers a repeat
    with the same reply. Steps from several threads are sent one at a time.
    If a step still fails with an unknown outcome, `sync()` (called by the
    next step) reads the server's step number: it equals the error's
    `step_number` if the step applied.

    After a server restored from a periodic snapshot (a crash), a step raises
    `StepOutOfOrderError` with `server_behind` true: call
    `resume_from(error.expected_step_number)` and send again your inputs from
    that step on (keep the inputs of the last snapshot interval to do so).

    Use it as a context manager to end the session on exit.
    """

    def __init__(self, client: Client, session_id: str, model: ModelInfo):
        self._client = client
        self.id = session_id
        self.model = model
        self.timesteps = 0  # as last reported by the server
        # The number of the last step the server reported applied.
        self.step_number = 0
        self._claimed = 0  # the last number sent, on a numbered stream
        self._lock = threading.Lock()  # one numbered step at a time
        self._unsure = False  # the outcome of the last numbered step is unknown

    def sync(self) -> int:
        """Reads the server's step number (and timesteps); returns it."""
        reply = self._client._call(
            self._client._stub.GetState,
            pb.GetStateRequest(session_id=self.id),
            retries.FOR_READS,
        )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        self._unsure = False
        return self.step_number

    def resume_from(self, step_number: int) -> None:
        """Makes `step_number` the next step sent: to replay after a restore."""
        if step_number < 1:
            raise ValueError(f"step_number: expected 1 or more, received {step_number}")
        self.step_number = step_number - 1
        self._unsure = False

    def step(
        self, inputs: np.ndarray, *, state: State | None = None, reset: bool = False
    ) -> Outputs:
        """Feeds inputs of shape [timesteps, *features]; returns the model's outputs.

        One array for a single-output model, else a tuple. Each has a leading
        timesteps axis when the model outputs per timestep. `state` replaces
        the stored state for this step; `reset` starts it from zeros.
        """
        outputs, _ = self._step(inputs, state, reset, return_state=False)
        return outputs

    def step_with_state(
        self, inputs: np.ndarray, *, state: State | None = None, reset: bool = False
    ) -> tuple[Outputs, State]:
        """As `step`, and also returns the state after the step."""
        return self._step(inputs, state, reset, return_state=True)

    def reset(self, state: State | None = None) -> None:
        """Back to zeros, or to `state`; the session stays open. Idempotent."""
        request = pb.ResetRequest(session_id=self.id)
        if state is not None:
            request.state.CopyFrom(_state_to_proto(state))
        self._client._call(self._client._stub.Reset, request, retries.REFUSED_UNAPPLIED)
        self.timesteps = 0

    def get_state(self) -> State:
        reply = self._client._call(
            self._client._stub.GetState,
            pb.GetStateRequest(session_id=self.id),
            retries.FOR_READS,
        )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        return _state_from_proto(reply.state)

    def set_state(self, state: State) -> None:
        """Replaces every part of the state; all parts must be given. Idempotent."""
        request = pb.SetStateRequest(session_id=self.id, state=_state_to_proto(state))
        self._client._call(
            self._client._stub.SetState, request, retries.REFUSED_UNAPPLIED
        )
        self.timesteps = 0

    def close(self) -> None:
        """Ends the session on the server. Raises NotFoundError if already gone."""
        reply = self._client._call(
            self._client._stub.EndSession, pb.EndSessionRequest(session_id=self.id)
        )
        self.timesteps = reply.timesteps

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        except NotFoundError:
            pass  # ended or expired already: nothing left to free

    def _step(self, inputs, state, reset, return_state):
        request = pb.StepRequest(
            session_id=self.id,
            inputs=tensors.to_proto(_cast(inputs, self.model.input.dtype)),
            reset=reset,
            return_state=return_state,
        )
        if state is not None:
            request.state.CopyFrom(_state_to_proto(state))
        if self._client.numbered_steps:
            with self._lock:
                reply = self._numbered_step(request)
        else:
            reply = self._client._call(
                self._client._stub.Step, request, retries.REFUSED_UNAPPLIED
            )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        state = _state_from_proto(reply.state) if return_state else None
        return _outputs(reply.outputs), state

    def _numbered_step(self, request: pb.StepRequest) -> pb.StepResponse:
        if self._unsure:
            self.sync()
        request.step_number = self.step_number + 1
        try:
            return self._client._call(
                self._client._stub.Step, request, retries.FOR_NUMBERED_STEPS
            )
        except SeqServeError as error:
            error.step_number = request.step_number
            self._unsure = error.code in retries.FOR_NUMBERED_STEPS
            raise

    def _claim_number(self) -> int:
        with self._lock:
            self._claimed = max(self._claimed, self.step_number) + 1
            return self._claimed

    def _unclaim(self) -> None:
        """After a refused stream step: later numbers restart from the last
        applied one (those already sent are refused in order before them)."""
        with self._lock:
            self._claimed = self.step_number


def _outputs(messages) -> Outputs:
    outputs = tuple(tensors.to_numpy(t) for t in messages)
    return outputs[0] if len(outputs) == 1 else outputs


def _cast(array, dtype: np.dtype) -> np.ndarray:
    """Casts within a kind (float64 to float32, say); the server checks the rest.

    Integers stay integers and floats floats. A value that does not survive
    the cast (an integer out of range, a float64 past float32's range) is sent
    as it is, for the server to refuse, rather than turned into another value.
    """
    array = np.asarray(array)
    if array.dtype == dtype or array.dtype.kind != dtype.kind:
        return array
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    if dtype.kind == "i" and not np.array_equal(cast, array):
        return array
    if dtype.kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(array)):
        return array
    return cast


def _state_to_proto(state: Mapping[str, Mapping[str, np.ndarray]]) -> pb.State:
    return pb.State(
        parts=[
            pb.StatePart(
                layer=layer,
                part=part,
                value=tensors.to_proto(_cast(value, np.dtype(np.float32))),
            )
            for layer, parts in state.items()
            for part, value in parts.items()
        ]
    )


def _state_from_proto(state: pb.State) -> State:
    result: State = {}
    for part in state.parts:
        result.setdefault(part.layer, {})[part.part] = tensors.to_numpy(part.value)
    return result
