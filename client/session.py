"""One server-side session: steps, state, and step numbers."""

import threading
from typing import TYPE_CHECKING

import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from . import retries, tensors
from .conversions import (
    Outputs,
    State,
    cast,
    outputs_of,
    state_from_proto,
    state_to_proto,
)
from .errors import NotFoundError, SeqServeError

if TYPE_CHECKING:
    from .client import Client, ModelInfo


class Session:
    """One server-side session. Calls on one session apply in the order the
    server receives them: one after another when each is waited for, as here.

    With the client's `numbered_steps` (the default), `step` sends the next
    step number and retries a step whose outcome is unknown (UNAVAILABLE,
    DEADLINE_EXCEEDED, CANCELLED) or that was refused unapplied
    (RESOURCE_EXHAUSTED): the server applies it once and answers a repeat
    with the same reply. Steps from several threads are sent one at a time.
    If a step still fails with an unknown outcome, sending the same step
    again is safe (see `step`); `sync()` reads the server's step number: it
    equals the error's `step_number` if the step applied.

    After a server restored from a periodic snapshot (a crash), a step raises
    `StepOutOfOrderError` with `server_behind` true: call
    `resume_from(error.expected_step_number)` and send again your inputs from
    that step on (keep the inputs of the last snapshot interval to do so).

    Use it as a context manager to end the session on exit.
    """

    def __init__(self, client: "Client", session_id: str, model: "ModelInfo"):
        self._client = client
        self.id = session_id
        self.model = model
        self.timesteps = 0  # as last reported by the server
        # The number of the last step the server reported applied.
        self.step_number = 0
        self._lock = threading.Lock()  # one numbered step at a time
        # The last numbered step, while its outcome is unknown.
        self._unresolved: pb.StepRequest | None = None
        self._resyncs = 0  # calls of sync() and resume_from(), for streams

    def sync(self) -> int:
        """Reads the server's step number (and timesteps); returns it."""
        reply = self._client._call(
            self._client._stub.GetState,
            pb.GetStateRequest(session_id=self.id),
            retries.FOR_READS,
        )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        self._unresolved = None
        self._resyncs += 1
        return self.step_number

    def resume_from(self, step_number: int) -> None:
        """Makes `step_number` the next step sent: to replay after a restore."""
        if step_number < 1:
            raise ValueError(f"step_number: expected 1 or more, received {step_number}")
        self.step_number = step_number - 1
        self._unresolved = None
        self._resyncs += 1

    def step(
        self, inputs: np.ndarray, *, state: State | None = None, reset: bool = False
    ) -> Outputs:
        """Feeds inputs of shape [timesteps, *features]; returns the model's outputs.

        One array for a single-output model, else a tuple. Each has a leading
        timesteps axis when the model outputs per timestep. `state` replaces
        the stored state for this step; `reset` starts it from zeros.

        Numbered (the default): when the last step failed with its outcome
        unknown (retries ran out), a step with the same inputs, `state` and
        `reset` (and the same call, `step` or `step_with_state`) is that step
        sent again under its number: it applies once, whether the first try
        had applied or not, and returns its outputs. A step with anything else
        first reads the server's step number (`sync()`) and follows what did
        apply.
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
            request.state.CopyFrom(state_to_proto(state))
        self._client._call(self._client._stub.Reset, request, retries.REFUSED_UNAPPLIED)
        self.timesteps = 0

    def get_state(self) -> State:
        reply = self._client._call(
            self._client._stub.GetState,
            pb.GetStateRequest(session_id=self.id),
            retries.FOR_READS,
        )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        return state_from_proto(reply.state)

    def set_state(self, state: State) -> None:
        """Replaces every part of the state; all parts must be given. Idempotent."""
        request = pb.SetStateRequest(session_id=self.id, state=state_to_proto(state))
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
            inputs=tensors.to_proto(cast(inputs, self.model.input.dtype)),
            reset=reset,
            return_state=return_state,
        )
        if state is not None:
            request.state.CopyFrom(state_to_proto(state))
        if self._client.numbered_steps:
            with self._lock:
                reply = self._numbered_step(request)
        else:
            reply = self._client._call(
                self._client._stub.Step, request, retries.REFUSED_UNAPPLIED
            )
        self.timesteps, self.step_number = reply.timesteps, reply.step_number
        state = state_from_proto(reply.state) if return_state else None
        return outputs_of(reply.outputs), state

    def _numbered_step(self, request: pb.StepRequest) -> pb.StepResponse:
        unresolved = self._unresolved
        if unresolved is not None:
            request.step_number = unresolved.step_number
            if request != unresolved:
                self.sync()
        if self._unresolved is None:
            request.step_number = self.step_number + 1
        try:
            reply = self._client._call(
                self._client._stub.Step, request, retries.FOR_NUMBERED_STEPS
            )
        except SeqServeError as error:
            error.step_number = request.step_number
            unknown = error.code in retries.FOR_NUMBERED_STEPS
            self._unresolved = request if unknown else None
            raise
        self._unresolved = None
        return reply

    def _next_number(self, claimed: int) -> int:
        """The next number on a numbered stream that sent up to `claimed`; waits
        for a unary numbered step in flight."""
        with self._lock:
            return max(claimed, self.step_number) + 1
