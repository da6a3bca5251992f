"""Operator actions on live sessions: list, describe, evict. No gRPC here."""

import logging

from .core import SequenceCore
from .errors import InvalidArgument
from .logs import about
from .sessions import EVICTED_BY_OPERATOR, OPERATOR, Session

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class SessionAdmin:
    """Thread-safe, as the core it works on."""

    def __init__(self, core: SequenceCore):
        self.core = core

    def list_sessions(
        self, model_name: str, page_size: int, after: str
    ) -> tuple[list[Session], int, bool]:
        """Live sessions (of `model_name` unless empty) with ids after `after`,
        in id order: (the page, how many match in all, whether more follow)."""
        if model_name:
            self.core.model(model_name)
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size: expected 1 to {MAX_PAGE_SIZE} (0 for "
                f"{DEFAULT_PAGE_SIZE}), received {page_size}"
            )
        matching = sorted(
            self.core.sessions.snapshot(model_name or None), key=lambda s: s.id
        )
        rest = [s for s in matching if s.id > after] if after else matching
        return rest[:size], len(matching), len(rest) > size

    def describe(self, session_id: str) -> Session:
        return self.core.sessions.live(session_id)

    def evict(self, session_id: str) -> int:
        """Ends a live session; returns its timesteps. Its later calls are
        NOT_FOUND, saying it was evicted."""
        session = self.core.sessions.remove(session_id, EVICTED_BY_OPERATOR, OPERATOR)
        log.info("session evicted by an operator", extra=about(session))
        self.core.metrics.session_ended(session.model, "evicted")
        return self.core.release(session)

    def evict_all(self, model_name: str, all_models: bool) -> int:
        """Evicts every live session of a model, or of every model when asked
        explicitly; returns how many."""
        if all_models == bool(model_name):
            raise InvalidArgument(
                "expected either a model or all_models, received "
                + ("both" if all_models else "neither")
            )
        if model_name:
            self.core.model(model_name)
        gone = self.core.sessions.remove_all(model_name or None, EVICTED_BY_OPERATOR)
        for session in gone:
            self.core.release_ended(session, "evicted")
        log.info(
            "%d sessions of %s evicted by an operator",
            len(gone),
            repr(model_name) if model_name else "every model",
        )
        return len(gone)
