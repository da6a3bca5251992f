"""The service core: sessions over models, without any gRPC.

Every call validates first, so a rejected request changes no state, then hands
the state-touching work to the model's executor and waits for it.
"""

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import snapshots
from .admission import Admission
from .config import Config
from .device_state import tensorflow_sees_a_gpu
from .errors import InvalidArgument, NotFound, Unavailable
from .executor import (
    ManyStepOp,
    ManyStepResult,
    ModelExecutor,
    StateOp,
    StepOp,
    StepResult,
    StoreOp,
)
from .loaded_versions import LoadedVersions
from .logs import about
from .metrics import Metrics
from .models import ServedModel
from .sessions import (
    ENDED_BY_CLIENT,
    EVICTED_FOR_ROOM,
    Session,
    SessionRegistry,
    SessionsFull,
    ended_message,
)
from .validation import StateEntry, check_inputs, check_state

log = logging.getLogger(__name__)


class SequenceCore:
    """Thread-safe: any number of callers may use it at once.

    `caller` arguments name the identity making a call (None when auth is off):
    a session started by one identity is refused to every other.
    """

    def __init__(
        self,
        models: Mapping[str, ServedModel] | Iterable[ServedModel],
        config: Config,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.metrics = Metrics() if metrics is None else metrics
        self.sessions = SessionRegistry(
            config.max_sessions, config.max_sessions_per_client
        )
        on_device = _states_on_device(config)
        self.versions = LoadedVersions(
            lambda model: ModelExecutor(
                model,
                config.max_batch_size,
                config.max_batch_wait_ms,
                state_on_device=on_device,
                stats=self.metrics.stats_for(model.name),
            )
        )
        for model in models.values() if isinstance(models, Mapping) else models:
            self.versions.add(model)
        # By model name, every loaded version together; made on first use.
        self.admissions: dict[str, Admission] = {}
        self.metrics.attach(self)
        self._stopping = threading.Event()
        self._reaper = None
        if config.idle_timeout_s > 0:
            self._reaper = threading.Thread(
                target=self._reap_idle, name="idle-reaper", daemon=True
            )
            self._reaper.start()

    @property
    def models(self) -> dict[str, ServedModel]:
        """The newest version of each model: the one new sessions start on."""
        return self.versions.newest

    def model(self, name: str, version: int = 0) -> ServedModel:
        return self.versions.find(name, version)

    def start_session(
        self,
        model_name: str,
        session_id: str,
        state: list[StateEntry] | None,
        version: int = 0,
        caller: str | None = None,
        client: str = "",
    ) -> tuple[Session, ServedModel]:
        """On `version` of the model (0: the newest). `client` is what the
        per-client session limit counts."""
        model = self.versions.acquire(model_name, version)
        try:
            values = (
                None if state is None else check_state(model, state, "initial_state")
            )
            session = self._admit(model.name, session_id, caller, client)
        except BaseException:
            self.versions.release(_key(model))
            raise
        session.version = model.version
        try:
            self._run(StateOp("start", session, values))
        except BaseException:
            self.sessions.discard(session)
            self.versions.release(_key(model))
            raise
        self.sessions.activate(session)
        self.metrics.session_started(model.name)
        log.debug(
            "session started on model %r version %d",
            model.name,
            model.version,
            extra=about(session),
        )
        return session, model

    def _admit(
        self, model_name: str, session_id: str, caller: str | None, client: str
    ) -> Session:
        """Reserves a session, evicting the least recently used one when full
        and the policy says so (a few tries: concurrent starts may take the room)."""
        for _ in range(3):
            try:
                return self.sessions.add(model_name, session_id, caller, client)
            except SessionsFull:
                if self.config.when_full != "evict-lru":
                    raise
                victim = self.sessions.remove_least_recent(EVICTED_FOR_ROOM)
                if victim is not None:
                    log.debug("session evicted to make room", extra=about(victim))
                    self.release_ended(victim, "evicted")
        return self.sessions.add(model_name, session_id, caller, client)

    def step(
        self,
        session_id: str,
        inputs: np.ndarray,
        state: list[StateEntry] | None = None,
        reset: bool = False,
        return_state: bool = False,
        caller: str | None = None,
        **call: Any,
    ) -> tuple[ServedModel, StepResult]:
        model, future = self.submit_step(
            session_id, inputs, state, reset, return_state, caller, **call
        )
        return model, future.result()

    def submit_step(
        self,
        session_id: str,
        inputs: np.ndarray,
        state: list[StateEntry] | None = None,
        reset: bool = False,
        return_state: bool = False,
        caller: str | None = None,
        step_number: int = 0,
        deadline_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[ServedModel, Future]:
        """As `step`, without waiting: the future's result is the StepResult.

        `step_number` (0: unnumbered), `deadline_s` (time.monotonic()) and
        `cancelled` are checked where the step applies (sequencing.py).
        """
        if step_number < 0:
            raise InvalidArgument(
                f"step_number: expected 0 (unnumbered) or more, received {step_number}"
            )
        session = self.sessions.get(session_id, caller)
        model, _ = self._runtime(session)
        check_inputs(model, inputs, max_timesteps=self.config.max_timesteps)
        if reset and state is not None:
            raise InvalidArgument(
                "expected either reset or an explicit state, received both"
            )
        values = None if state is None else check_state(model, state, "state")
        op = StepOp(session, inputs, values, reset, return_state)
        op.step_number, op.deadline_s, op.cancelled = step_number, deadline_s, cancelled
        return model, self._submit_admitted(session, op, steps=1)

    def step_many(
        self,
        session_ids: list[str],
        inputs: np.ndarray,
        reset: bool = False,
        return_state: bool = False,
        caller: str | None = None,
        deadline_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[ServedModel, ManyStepResult]:
        """Steps distinct sessions of one model version as one batch; all or
        nothing."""
        sessions = self._distinct_sessions(session_ids, caller)
        model, _ = self._runtime(sessions[0])
        name, version = _key(model)
        others = [s for s in sessions if s.version != version or s.model != name]
        if others:
            raise InvalidArgument(
                f"session_ids: expected sessions of one model version, received "
                f"sessions of {model.name!r} version {model.version} and "
                f"{others[0].model!r} version {others[0].version} ({others[0].id!r})"
            )
        check_inputs(
            model,
            inputs,
            sessions=len(sessions),
            max_timesteps=self.config.max_timesteps,
        )
        op = ManyStepOp(sessions, inputs, reset, return_state)
        op.deadline_s, op.cancelled = deadline_s, cancelled
        return model, self._submit_admitted(sessions[0], op, len(sessions)).result()

    def write_state(
        self,
        session_id: str,
        state: list[StateEntry] | None,
        caller: str | None = None,
    ) -> None:
        """Reset (state None: zeros) or set a session's state."""
        session = self.sessions.get(session_id, caller)
        model, _ = self._runtime(session)
        values = None if state is None else check_state(model, state, "state")
        self._run(StateOp("write", session, values))

    def read_state(self, session_id: str, caller: str | None = None):
        """(model, state, timesteps, step number) of a session."""
        session = self.sessions.get(session_id, caller)
        model, _ = self._runtime(session)
        values, timesteps, step_number = self._run(StateOp("read", session))
        return model, values, timesteps, step_number

    def end_session(self, session_id: str, caller: str | None = None) -> int:
        """Returns the session's timesteps; steps submitted before still apply."""
        session = self.sessions.remove(session_id, ENDED_BY_CLIENT, caller)
        self.metrics.session_ended(session.model, "closed")
        log.debug("session ended by the client", extra=about(session))
        return self.release(session)

    def release(self, session: Session) -> int:
        """Frees an ended session's state once its submitted steps have applied;
        returns its timesteps."""
        return self._release(session).result()

    def export_session(self, session_id: str, caller: str | None = None) -> bytes:
        """The session in the snapshot format; it stays live."""
        session = self.sessions.get(session_id, caller)
        return snapshots.export_session(self, session)

    def import_session(
        self, data: bytes, caller: str | None = None, client: str = ""
    ) -> tuple[Session, ServedModel]:
        """Creates an exported session under its own id, owned by `caller`;
        all or nothing."""
        return snapshots.import_session(self, data, caller, client)

    def queue_depth(self, model_name: str) -> int:
        """Operations queued for every loaded version of the model."""
        return sum(executor.queued() for _, executor in self.versions.of(model_name))

    def _distinct_sessions(
        self, session_ids: list[str], caller: str | None
    ) -> list[Session]:
        if not session_ids:
            raise InvalidArgument("session_ids: expected at least one, received none")
        if len(set(session_ids)) != len(session_ids):
            seen: set[str] = set()
            twice = next(i for i in session_ids if i in seen or seen.add(i))
            raise InvalidArgument(
                f"session_ids: expected distinct sessions, received {twice!r} twice"
            )
        return self.sessions.get_many(session_ids, caller)

    def close(self) -> None:
        self._stopping.set()
        self.versions.close()

    def _runtime(self, session: Session) -> tuple[ServedModel, ModelExecutor]:
        """The session's model version and its executor."""
        entry = self.versions.get(_key(session))
        if entry is None:  # unloaded: its last session ended meanwhile
            reason = session.end_reason or ENDED_BY_CLIENT
            raise NotFound(ended_message(session.id, reason))
        return entry

    def run_on_model(self, model: ServedModel, apply, sessions=()):
        """Runs `apply(store)` on the executor of the model's version, in order
        with the other operations of `sessions`; returns its result."""
        entry = self.versions.get(_key(model))
        if entry is None:
            raise NotFound(f"model {model.name!r} version {model.version} is gone")
        return entry[1].submit(StoreOp(apply, list(sessions))).result()

    def _submit_admitted(self, session: Session, op: StepOp | ManyStepOp, steps: int):
        """Queues a step if its model's admission lets it in, else raises
        ResourceExhausted before anything is queued."""
        limit = self.config.max_queued_steps
        admission = self.admissions.setdefault(
            session.model, Admission(session.model, limit)
        )
        admission.admit(steps)
        try:
            future = self._submit(session, op)
        except BaseException:
            admission.release(steps)
            raise
        admission.release_when_done(future, steps)
        return future

    def _run(self, op: StepOp | StateOp | ManyStepOp):
        session = op.sessions[0] if isinstance(op, ManyStepOp) else op.session
        return self._submit(session, op).result()

    def _submit(self, session: Session, op) -> Future:
        _, executor = self._runtime(session)
        try:
            return executor.submit(op)
        except Unavailable:
            self._runtime(session)  # NotFound if its version was just unloaded
            raise

    def _release(self, session: Session) -> Future:
        """Frees the session's state row; the version then counts it gone."""
        future = self._submit(session, StateOp("release", session))
        future.add_done_callback(lambda _: self.versions.release(_key(session)))
        return future

    def _reap_idle(self) -> None:
        # A session expires between idle_timeout_s and 1.25 times that after its
        # last call (at most 1 s late for long timeouts).
        interval = min(1.0, max(0.01, self.config.idle_timeout_s / 4))
        while not self._stopping.wait(interval):
            for session in self.sessions.remove_idle(self.config.idle_timeout_s):
                log.debug("session expired after idle timeout", extra=about(session))
                self.release_ended(session, "idle_timeout")

    def release_ended(self, session: Session, reason: str) -> None:
        """Frees the state of a session that nobody waits for (expired, evicted)."""
        self.metrics.session_ended(session.model, reason)
        try:
            future = self._release(session)
        except Unavailable:
            return  # shutting down: the whole store goes with the executor
        future.add_done_callback(_log_failure)


def _key(item: Session | ServedModel) -> tuple[str, int]:
    name = item.model if isinstance(item, Session) else item.name
    return name, item.version


def _states_on_device(config: Config) -> bool:
    if config.state_storage == "auto":
        on_device = tensorflow_sees_a_gpu()
    else:
        on_device = config.state_storage == "tensorflow"
    log.info(
        "session states kept in %s",
        "TensorFlow variables (every step runs through TensorFlow)"
        if on_device
        else "host arrays",
    )
    return on_device


def _log_failure(future) -> None:
    # Nobody waits for such a release, so its failure is logged here.
    if future.exception() is not None:
        log.error("releasing an ended session failed", exc_info=future.exception())
