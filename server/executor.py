"""One thread per model that applies every state-touching operation in order.

Steps that arrive while the model is busy are batched into one execution:
steps of different sessions with the same number of timesteps run together, at
most one step of a session per batch. For each session, operations apply in
the order they were submitted. A lone step runs at once; nothing waits for a
batch to fill.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from . import sequencing
from .device_state import TensorFlowStateStore
from .errors import NotFound, Unavailable
from .metrics import ModelStats
from .models import ServedModel
from .sessions import ENDED_BY_CLIENT, Session, ended_message
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
    submitted_s: float = dataclasses.field(default_factory=time.perf_counter)
    step_number: int = 0  # 0: unnumbered (see sequencing.py)
    deadline_s: float | None = None  # time.monotonic() after which it must not run
    cancelled: Callable[[], bool] | None = None  # true once the call is over


@dataclasses.dataclass(eq=False)
class StateOp:
    """Start, write (reset or set), read, or release one session's state."""

    kind: str
    session: Session
    state: list[np.ndarray] | None = None
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future
    )


@dataclasses.dataclass(eq=False)
class ManyStepOp:
    """One step of several distinct sessions, run as one batch, all or nothing."""

    sessions: list[Session]
    inputs: np.ndarray  # [sessions, timesteps, ...], already validated
    reset: bool
    return_state: bool
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future
    )
    submitted_s: float = dataclasses.field(default_factory=time.perf_counter)
    deadline_s: float | None = None
    cancelled: Callable[[], bool] | None = None


@dataclasses.dataclass(eq=False)
class StoreOp:
    """Runs `apply(store)` on the executor's thread, between other operations
    (snapshots and restores); `sessions` are those it must stay in order with."""

    apply: Callable
    sessions: list[Session] = dataclasses.field(default_factory=list)
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future
    )


@dataclasses.dataclass(frozen=True)
class ManyStepResult:
    outputs: list[np.ndarray]  # each [sessions, ...]
    state: list[np.ndarray] | None  # each [sessions, units]
    timesteps: list[int]
    step_numbers: list[int]


@dataclasses.dataclass(frozen=True)
class StepResult:
    outputs: list[np.ndarray]
    state: list[np.ndarray] | None
    timesteps: int
    step_number: int = 0


class ModelExecutor:
    """Applies a model's operations in order, batching those that wait.

    When nothing is running or queued, `submit` runs the operation at once in
    the caller's thread: a lone session pays no handoff to another thread and
    back (each costs a GIL switch). Otherwise the operation is queued and the
    executor's own thread runs it with whatever else waits. Either way only one
    thread runs the model at a time, in submission order.
    """

    def __init__(
        self,
        model: ServedModel,
        max_batch_size: int,
        max_batch_wait_ms: float = 0.0,
        state_on_device: bool = False,
        stats: ModelStats | None = None,
    ):
        self.model = model
        self.stats = ModelStats() if stats is None else stats
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self._last_collected = 1
        units = tuple(p.units for p in model.state_parts)
        store = TensorFlowStateStore if state_on_device else StateStore
        self._store = store(units, model.recurrent_layers)
        self._queue: collections.deque = collections.deque()
        self._changed = threading.Condition(threading.Lock())
        self._running = False  # a thread is applying operations; under _changed
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name=f"executor-{model.name}", daemon=True
        )
        self._thread.start()

    def submit(self, op: StepOp | StateOp | ManyStepOp) -> concurrent.futures.Future:
        with self._changed:
            if self._closed:
                raise Unavailable("the server is shutting down")
            inline = not self._running and not self._queue
            if inline:
                self._running = True
            else:
                self._queue.append(op)
                self._changed.notify()
        if inline:
            try:
                self._apply([op])
            finally:
                self._finish_run()
        return op.future

    def queued(self) -> int:
        """Operations submitted and not yet taken up by the executor thread."""
        return len(self._queue)

    def close(self) -> None:
        """Finishes what was submitted, then stops the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _loop(self) -> None:
        while (pending := self._collect()) is not None:
            try:
                self._apply(pending)
            finally:
                self._finish_run()

    def _apply(self, ops: list) -> None:
        try:
            self._run_rounds(ops)
        except Exception as error:  # a bug here must not leave callers waiting
            log.exception("executor of model %r failed", self.model.name)
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(error)

    def _finish_run(self) -> None:
        with self._changed:
            self._running = False
            if self._queue or self._closed:
                self._changed.notify()

    def _collect(self) -> list | None:
        """What is queued, up to a few batches' worth; None once closed and drained.

        With a maximum wait, keeps collecting until as many operations came as
        in the last collection (capped at a batch), or the wait from the first
        operation is over. So a lone session never waits; without a maximum
        wait, it takes what is there.
        """
        limit = 4 * self.max_batch_size
        with self._changed:
            while self._running or not (self._queue or self._closed):
                self._changed.wait()
            if not self._queue:
                return None
            self._running = True
            pending = _take(self._queue, limit)
            deadline = time.monotonic() + self.max_batch_wait_s
            expected = min(self._last_collected, self.max_batch_size)
            while len(pending) < min(expected, limit) and not self._closed:
                wait_s = deadline - time.monotonic()
                if wait_s <= 0:
                    break
                self._changed.wait(wait_s)
                pending += _take(self._queue, limit - len(pending))
        self._last_collected = len(pending)
        return pending

    def _run_rounds(self, pending: list) -> None:
        """Each round takes at most one operation per session, in submission order."""
        while pending:
            taken: set[int] = set()
            later, steps_by_length, many = [], {}, []
            for op in pending:
                ids = [id(s) for s in _sessions(op)]
                blocked = not taken.isdisjoint(ids)
                # A deferred operation holds back every later one of its sessions.
                taken.update(ids)
                if blocked:
                    later.append(op)
                elif isinstance(op, StepOp):
                    steps_by_length.setdefault(len(op.inputs), []).append(op)
                elif isinstance(op, ManyStepOp):
                    many.append(op)
                else:
                    _settle(op, self._apply_state_op)
            for steps in steps_by_length.values():
                for start in range(0, len(steps), self.max_batch_size):
                    self._run_steps(steps[start : start + self.max_batch_size])
            for op in many:
                _settle(op, self._execute_many)
            pending = later

    def _apply_state_op(self, op: StateOp | StoreOp):
        if isinstance(op, StoreOp):
            return op.apply(self._store)
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
            return (
                self._store.read(session.slot),
                session.timesteps,
                session.step_number,
            )
        if op.kind == "release":
            session.released = True
            self._store.release(session.slot)
            return session.timesteps
        raise ValueError(f"unknown state operation {op.kind!r}")

    def _run_steps(self, steps: list[StepOp]) -> None:
        live = [op for op in steps if sequencing.admit(op)]
        if not live:
            return
        try:
            results = self._execute(live)
        except Exception as error:  # the batch fails as a whole; no state changed
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            # One session's input can fail a batch (an index past an Embedding's
            # vocabulary, say); run each alone so only that session sees the error.
            for op in live:
                self._run_steps([op])
            return
        self.stats.record_steps(live)
        for op, result in zip(live, results):
            op.future.set_result(sequencing.record(op, result))

    def _execute(self, steps: list[StepOp]) -> list[StepResult]:
        slots = np.fromiter((op.session.slot for op in steps), np.intp, len(steps))
        states, has_output = self._store.gather(slots)
        states, has_output = self._restart_rows(steps, states, has_output)
        if len(steps) == 1:  # a lone session; np.stack costs more than the step
            inputs = steps[0].inputs[None]
        else:
            inputs = np.stack([op.inputs for op in steps])
        outputs, states, has_output = self._run_model(inputs, states, has_output)
        self._store.scatter(slots, states, has_output)
        if any(op.return_state for op in steps):
            states = [np.asarray(part) for part in states]

        results = []
        for row, op in enumerate(steps):
            restarted = op.reset or op.state is not None
            before = 0 if restarted else op.session.timesteps
            op.session.timesteps = before + len(op.inputs)
            state = [s[row] for s in states] if op.return_state else None
            outputs_row = [o[row] for o in outputs]
            number = op.session.step_number + 1  # counted by sequencing.record
            results.append(StepResult(outputs_row, state, op.session.timesteps, number))
        return results

    def _run_model(self, inputs, states, has_output):
        return self.model.run(
            inputs, states, has_output, on_device=self._store.on_device
        )

    def _restart_rows(self, steps: list[StepOp], states, has_output):
        """Rows that reset or bring their own state start from it, as after a
        write, and output zeros at masked steps before their first unmasked one."""
        restart = np.array([op.reset or op.state is not None for op in steps])
        if not restart.any():
            return states, has_output
        given = [np.zeros(tuple(part.shape), np.float32) for part in states]
        for row, op in enumerate(steps):
            for index, value in enumerate(op.state or ()):
                given[index][row] = value
        where = self._store.where
        no_output = np.zeros(len(steps), bool)
        states = [where(restart[:, None], g, s) for g, s in zip(given, states)]
        has_output = [where(restart, no_output, h) for h in has_output]
        return states, has_output

    def _execute_many(self, op: ManyStepOp) -> ManyStepResult:
        for session in op.sessions:
            _require_live(session)
        sequencing.check_call(op)
        slots = np.fromiter((s.slot for s in op.sessions), np.intp, len(op.sessions))
        if op.reset:
            states = self.model.zero_states(len(slots))
            has_output = [np.zeros(len(slots), bool)] * self.model.recurrent_layers
        else:
            states, has_output = self._store.gather(slots)
        outputs, states, has_output = self._run_model(op.inputs, states, has_output)
        self._store.scatter(slots, states, has_output)
        if op.return_state:
            states = [np.asarray(part) for part in states]

        length = op.inputs.shape[1]
        for session in op.sessions:
            session.timesteps = (0 if op.reset else session.timesteps) + length
        timesteps = [session.timesteps for session in op.sessions]
        self.stats.record_many(op)
        state = states if op.return_state else None
        step_numbers = sequencing.advance(op.sessions)
        return ManyStepResult(outputs, state, timesteps, step_numbers)


def _take(queue: collections.deque, most: int) -> list:
    taken = []
    while queue and len(taken) < most:
        taken.append(queue.popleft())
    return taken


def _sessions(op) -> list[Session]:
    return op.sessions if isinstance(op, ManyStepOp | StoreOp) else [op.session]


def _settle(op: StateOp | ManyStepOp | StoreOp, apply) -> None:
    # Errors go to the caller, which logs unexpected ones once, at the boundary.
    try:
        op.future.set_result(apply(op))
    except Exception as error:
        op.future.set_exception(error)


def _require_live(session: Session) -> None:
    if session.released:
        raise NotFound(_ended_message(session))


def _ended_message(session: Session) -> str:
    return ended_message(session.id, session.end_reason or ENDED_BY_CLIENT)
