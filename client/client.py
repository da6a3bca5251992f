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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from . import tensors
from .errors import NotFoundError, SeqServeError, from_code, from_rpc_error

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

    `timeout_s` is the deadline of each call (None: no deadline).

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
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def list_models(self) -> list[ModelInfo]:
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_proto(m) for m in reply.models]

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
        reply = self._call(self._stub.StepMany, request)
        for session, timesteps in zip(sessions, reply.timesteps):
            session.timesteps = timesteps
        return _outputs(reply.outputs)

    def step_stream(
        self, steps: Iterable[tuple["Session", np.ndarray]]
    ) -> Iterator[Outputs | SeqServeError]:
        """Sends (session, inputs) pairs on one stream; yields, in the same order,
        each step's outputs, or the typed error that refused that step (the
        stream goes on). Steps of one session apply in the order sent."""
        sent: queue.SimpleQueue = queue.SimpleQueue()

        def requests():
            for session, inputs in steps:
                sent.put(session)
                yield pb.StepRequest(
                    session_id=session.id,
                    inputs=tensors.to_proto(_cast(inputs, session.model.input.dtype)),
                )

        try:
            replies = self._stub.StepStream(
                requests(), timeout=None, metadata=self._metadata
            )
            for outcome in replies:
                session = sent.get()
                if outcome.HasField("error"):
                    yield from_code(outcome.error.code, outcome.error.message)
                    continue
                session.timesteps = outcome.response.timesteps
                yield _outputs(outcome.response.outputs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: Callable, request):
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class Session:
    """One server-side session. Calls on one session apply in the order the
    server receives them: one after another when each is waited for, as here.

    Use it as a context manager to end the session on exit.
    """

    def __init__(self, client: Client, session_id: str, model: ModelInfo):
        self._client = client
        self.id = session_id
        self.model = model
        self.timesteps = 0  # as last reported by the server

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
        self._client._call(self._client._stub.Reset, request)
        self.timesteps = 0

    def get_state(self) -> State:
        reply = self._client._call(
            self._client._stub.GetState, pb.GetStateRequest(session_id=self.id)
        )
        self.timesteps = reply.timesteps
        return _state_from_proto(reply.state)

    def set_state(self, state: State) -> None:
        """Replaces every part of the state; all parts must be given. Idempotent."""
        request = pb.SetStateRequest(session_id=self.id, state=_state_to_proto(state))
        self._client._call(self._client._stub.SetState, request)
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
        reply = self._client._call(self._client._stub.Step, request)
        self.timesteps = reply.timesteps
        state = _state_from_proto(reply.state) if return_state else None
        return _outputs(reply.outputs), state


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
