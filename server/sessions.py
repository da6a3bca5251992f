"""The registry of live sessions, and a memory of recently ended ones."""

import collections
import dataclasses
import re
import secrets
import threading
import time
from typing import NoReturn

from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SeqServeError,
)

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REMEMBERED_ENDINGS = 100_000
ENDED_BY_CLIENT = "was ended by the client"
EVICTED_BY_OPERATOR = "was evicted by an operator"
EVICTED_FOR_ROOM = (
    "was evicted, least recently used, to make room for a new session "
    "(--when-full evict-lru)"
)


class SessionsFull(ResourceExhausted):
    """The server holds its maximum of live sessions."""


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    model: str
    created_s: float
    last_used_s: float
    version: int = 1  # of the model; set at start
    last_step_s: float = 0.0  # time.monotonic() of the last step; 0 before any
    slot: int = -1  # the row in the model's state store; set by its executor
    timesteps: int = 0  # since start, reset or set
    # False until its state row exists: calls must not reach the executor before
    # the start operation, or they would touch a row that is not theirs.
    started: bool = False
    released: bool = False  # set by the executor once the slot is freed
    end_reason: str = ""  # for calls already in flight when it ended
    # Steps applied since start, numbered or not; only its executor changes it.
    step_number: int = 0
    # The reply of the last step if it was numbered, returned again on a repeat.
    last_reply: object = None
    # The identity that started it, the only one that may use it; None when
    # auth is off. `client` is what the per-client limit counts.
    owner: str | None = None
    client: str = ""


class SessionRegistry:
    """Thread-safe. Knows why a session is gone: ended, expired, or never known."""

    def __init__(self, max_sessions: int, max_per_client: int = 0):
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client  # 0: no limit
        self._lock = threading.Lock()
        # In order of last use, least recent first (for --when-full evict-lru).
        self._live: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def add(
        self,
        model: str,
        session_id: str,
        owner: str | None = None,
        client: str = "",
    ) -> Session:
        """Reserves the id (minted when empty); invisible to `get` until `activate`."""
        if session_id:
            _check_format(session_id)
        now = time.monotonic()
        with self._lock:
            if session_id in self._live:
                raise AlreadyExists(
                    f"session {session_id!r} already exists; propose another id, or "
                    "leave it empty for the server to mint one"
                )
            if len(self._live) >= self.max_sessions:
                raise SessionsFull(
                    f"the server holds its maximum of {self.max_sessions} sessions; "
                    "end idle sessions or raise --max-sessions"
                )
            self._check_client_limit(client)
            session_id = session_id or _mint(self._live)
            self._ended.pop(session_id, None)
            session = Session(
                session_id,
                model,
                created_s=now,
                last_used_s=now,
                owner=owner,
                client=client,
            )
            self._live[session_id] = session
            self._per_client[client] += 1
            return session

    def _check_client_limit(self, client: str) -> None:
        held = self._per_client[client]
        if self.max_per_client and held >= self.max_per_client:
            raise ResourceExhausted(
                f"client {client!r} holds its maximum of {self.max_per_client} "
                "sessions (--max-sessions-per-client); end some of them first"
            )

    def _drop(self, session: Session) -> None:
        del self._live[session.id]
        self._per_client[session.client] -= 1
        if not self._per_client[session.client]:
            del self._per_client[session.client]

    def activate(self, session: Session) -> None:
        with self._lock:
            session.started = True

    def discard(self, session: Session) -> None:
        """Drops a session whose start failed; nobody has seen it, so none is kept."""
        with self._lock:
            if self._live.get(session.id) is session:
                self._drop(session)

    def get(self, session_id: str, caller: str | None = None) -> Session:
        """Returns the live session and marks it used; `caller` is the identity
        calling, refused unless it started the session (when auth is on)."""
        _check_given(session_id)
        with self._lock:
            session = self._owned(session_id, caller)
            session.last_used_s = time.monotonic()
            self._live.move_to_end(session_id)
            return session

    def get_many(
        self, session_ids: list[str], caller: str | None = None
    ) -> list[Session]:
        """As `get` for each id, under one lock; errors name the item's index."""
        now = time.monotonic()
        with self._lock:
            sessions = [self._live.get(i) for i in session_ids]
            for index, session in enumerate(sessions):
                if (
                    session is None
                    or not session.started
                    or not _usable_by(session, caller)
                ):
                    self._refuse_item(index, session_ids[index], caller)
                session.last_used_s = now
                self._live.move_to_end(session.id)
            return sessions

    def started(self, model: str) -> list[Session]:
        """The live, started sessions of one model, at this moment."""
        with self._lock:
            return [s for s in self._live.values() if s.model == model and s.started]

    def _refuse_item(self, index: int, session_id: str, caller: str | None) -> NoReturn:
        try:
            _check_given(session_id)
            self._owned(session_id, caller)
        except SeqServeError as error:
            raise type(error)(f"session_ids[{index}]: {error}") from None

    def remove(
        self, session_id: str, reason: str, caller: "str | None | Operator" = None
    ) -> Session:
        _check_given(session_id)
        with self._lock:
            session = self._owned(session_id, caller)
            self._drop(session)
            self._remember(session, reason)
            return session

    def remove_least_recent(self, reason: str) -> Session | None:
        """Removes the started session used least recently; None when none is."""
        with self._lock:
            for session in self._live.values():
                if session.started:
                    self._drop(session)
                    self._remember(session, reason)
                    return session
            return None

    def remove_all(self, model: str | None, reason: str) -> list[Session]:
        """Removes every started session of `model` (None: of every model)."""
        with self._lock:
            gone = [
                s
                for s in self._live.values()
                if s.started and (model is None or s.model == model)
            ]
            for session in gone:
                self._drop(session)
                self._remember(session, reason)
            return gone

    def live(self, session_id: str) -> Session:
        """The live session, without marking it used (for inspection)."""
        _check_given(session_id)
        with self._lock:
            return self._started(session_id)

    def snapshot(self, model: str | None = None) -> list[Session]:
        """The started sessions (of `model`, when given), in no set order."""
        with self._lock:
            return [
                s
                for s in self._live.values()
                if s.started and (model is None or s.model == model)
            ]

    def count_by_model(self) -> dict[str, int]:
        with self._lock:
            return dict(
                collections.Counter(s.model for s in self._live.values() if s.started)
            )

    def remove_idle(self, idle_timeout_s: float) -> list[Session]:
        cutoff = time.monotonic() - idle_timeout_s
        reason = f"expired after {idle_timeout_s:g} s without a call"
        with self._lock:
            idle = [
                s for s in self._live.values() if s.started and s.last_used_s < cutoff
            ]
            for session in idle:
                self._drop(session)
                self._remember(session, reason)
            return idle

    def _started(self, session_id: str) -> Session:
        session = self._live.get(session_id)
        if session is None or not session.started:
            raise NotFound(self._why_missing(session_id))
        return session

    def _owned(self, session_id: str, caller: "str | None | Operator") -> Session:
        """As `_started`, refused unless `caller` may use the session."""
        session = self._started(session_id)
        if not _usable_by(session, caller):
            raise PermissionDenied(
                f"session {session_id!r} was started by other credentials; only "
                "they may use it; start a session of your own"
            )
        return session

    def _remember(self, session: Session, reason: str) -> None:
        session.end_reason = reason
        self._ended[session.id] = reason
        if len(self._ended) > REMEMBERED_ENDINGS:
            self._ended.popitem(last=False)

    def _why_missing(self, session_id: str) -> str:
        reason = self._ended.get(session_id)
        if reason is None:
            return (
                f"session {session_id!r} is unknown to this server; start one with "
                "StartSession"
            )
        return ended_message(session_id, reason)


def ended_message(session_id: str, reason: str) -> str:
    return f"session {session_id!r} {reason}; start a new session to continue"


class Operator:
    """Passed as `caller` by admin paths: an operator may act on any session."""


OPERATOR = Operator()


def _usable_by(session: Session, caller: str | None | Operator) -> bool:
    return session.owner is None or caller is OPERATOR or session.owner == caller


def _check_given(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id: expected a session id, received none")
    _check_format(session_id)


def _check_format(session_id: str) -> None:
    # A malformed id can never name a session, so it is a malformed request.
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            "session_id: expected 1 to 128 characters of [A-Za-z0-9._:-], "
            f"received {session_id[:140]!r}"
        )


def _mint(taken: dict) -> str:
    while True:
        session_id = secrets.token_urlsafe(18)
        if session_id not in taken:
            return session_id
