"""One thread per model that applies every state-touching operation in order.

Steps that arrive while the model is busy are batched into one execution:
steps of different sessions with the same number of timesteps run together, at
most one step of a session per batch. For each session, operations apply in
the order they were submitted. A lone step runs at once; nothing waits for a
batch to fill.
"""

import concurrent.futures
import dataclasses
import logging
import queue
import threading

import numpy as np

from .errors import NotFound, SeqServeError, Unavailable
from .models import ServedModel
from .sessions import Session
from .state_store import StateStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class StepOp:
    session: Session
    inputs: np.ndarray  # [timesteps, ...], already validated
    state: list[np.ndarray] | None  # use instead of the stored state
    reset: bool
    return_state: bool
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future
    )


@dataclasses.dataclass(eq=False)
class StateOp:
    """Start, write (reset or set), read, or release one session's state."""

    kind: str
    session: Session
    state: list[np.ndarray] | None = None
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future
    )


@dataclasses.dataclass(frozen=True)
class StepResult:
    outputs: list[np.ndarray]
    state: list[np.ndarray] | None
    timesteps: int


class ModelExecutor:
    def __init__(self, model: ServedModel, max_batch_size: int):
        self.model = model
        self.max_batch_size = max_batch_size
        units = tuple(p.units for p in model.state_parts)
        self._store = StateStore(units, model.recurrent_layers)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name=f"executor-{model.name}", daemon=True
        )
        self._thread.start()

    def submit(self, op: StepOp | StateOp) -> concurrent.futures.Future:
        if self._closed:
            raise Unavailable("the server is shutting down")
        self._queue.put(op)
        return op.future

    def close(self) -> None:
        """Finishes what was submitted, then stops the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            pending = [op]
            while len(pending) < 4 * self.max_batch_size:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in pending:  # closing: finish what came before
                self._run_rounds(pending[: pending.index(None)])
                return
            self._run_rounds(pending)

    def _run_rounds(self, pending: list) -> None:
        """Each round takes at most one operation per session, in submission order."""
        while pending:
            taken: set[int] = set()
            later, steps_by_length = [], {}
            for op in pending:
                if id(op.session) in taken:
                    later.append(op)
                    continue
                taken.add(id(op.session))
                if isinstance(op, StepOp):
                    steps_by_length.setdefault(len(op.inputs), []).append(op)
                else:
                    _settle(op, self._apply_state_op)
            for steps in steps_by_length.values():
                for start in range(0, len(steps), self.max_batch_size):
                    self._run_steps(steps[start : start + self.max_batch_size])
            pending = later

    def _apply_state_op(self, op: StateOp):
        session = op.session
        if op.kind == "start":
            session.slot = self._store.allocate()
            self._store.write(session.slot, op.state)
            return None
        _require_live(session)
        if op.kind == "write":
            self._store.write(session.slot, op.state)
            session.timesteps = 0
            return None
        if op.kind == "read":
            return self._store.read(session.slot), session.timesteps
        if op.kind == "release":
            session.released = True
            self._store.release(session.slot)
            return session.timesteps
        raise ValueError(f"unknown state operation {op.kind!r}")

    def _run_steps(self, steps: list[StepOp]) -> None:
        live = []
        for op in steps:
            if op.session.released:
                op.future.set_exception(NotFound(_ended_message(op.session)))
            else:
                live.append(op)
        if not live:
            return
        slots = np.fromiter((op.session.slot for op in live), np.intp, len(live))
        try:
            states, has_output = self._store.gather(slots)
            _override_states(live, states, has_output)
            inputs = np.stack([op.inputs for op in live])
            outputs, states, has_output = self.model.run(inputs, states, has_output)
            self._store.scatter(slots, states, has_output)
        except Exception as error:  # the batch fails as a whole; no state changed
            log.exception("step of model %r failed", self.model.name)
            for op in live:
                op.future.set_exception(error)
            return
        for row, op in enumerate(live):
            restarted = op.reset or op.state is not None
            op.session.timesteps = (0 if restarted else op.session.timesteps) + len(
                op.inputs
            )
            state = [s[row] for s in states] if op.return_state else None
            result = StepResult([o[row] for o in outputs], state, op.session.timesteps)
            op.future.set_result(result)


def _override_states(steps: list[StepOp], states, has_output) -> None:
    """Rows that reset or bring their own state start from it, as after `write`."""
    for row, op in enumerate(steps):
        if not (op.reset or op.state is not None):
            continue
        for index, part in enumerate(states):
            part[row] = 0.0 if op.state is None else op.state[index]
        for flags in has_output:
            flags[row] = False


def _settle(op: StateOp, apply) -> None:
    try:
        op.future.set_result(apply(op))
    except SeqServeError as error:
        op.future.set_exception(error)
    except Exception as error:
        log.exception("state operation %r failed", op.kind)
        op.future.set_exception(error)


def _require_live(session: Session) -> None:
    if session.released:
        raise NotFound(_ended_message(session))


def _ended_message(session: Session) -> str:
    return f"session {session.id!r} has ended"
