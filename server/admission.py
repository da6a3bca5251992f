"""Admission of steps: a bound on the work queued for one model.

Without it, streams and many concurrent calls can queue steps faster than the
model runs them, and every caller's latency grows without bound. Past the
bound a step is refused at once with RESOURCE_EXHAUSTED, before it is queued,
so the client can back off or go elsewhere; nothing admitted is dropped.
"""

import threading
from concurrent.futures import Future

from .errors import ResourceExhausted


class Admission:
    """Counts the session-steps of one model admitted and not yet finished.

    A request is admitted while fewer than `limit` are queued, whatever its own
    size, so a large StepMany is never refused forever. Thread-safe.
    """

    def __init__(self, model: str, limit: int):
        self.model = model
        self.limit = limit  # 0: no limit
        self.refused = 0
        self._queued = 0
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        return self._queued

    def admit(self, steps: int) -> None:
        """Counts `steps` in, or raises ResourceExhausted; pair with `release`."""
        with self._lock:
            if self.limit and self._queued >= self.limit:
                self.refused += 1
                raise ResourceExhausted(
                    f"model {self.model!r} has {self._queued} session-steps queued, "
                    f"its maximum (--max-queued-steps {self.limit}); retry after a "
                    "short backoff, or send fewer steps at once"
                )
            self._queued += steps

    def release(self, steps: int) -> None:
        with self._lock:
            self._queued -= steps

    def release_when_done(self, future: Future, steps: int) -> None:
        future.add_done_callback(lambda _: self.release(steps))
