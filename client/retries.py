"""Retrying calls that are safe to repeat, with backoff, jitter and a deadline.

What is safe depends on the call: a numbered step can always be sent again
(the server applies it once and returns the same reply to a repeat); an
unnumbered one only when the server certainly refused it before applying it.
"""

import dataclasses
import random
import time
from collections.abc import Callable

import grpc

from .errors import SeqServeError, from_rpc_error

_CODE = grpc.StatusCode
# The server refused the call before it did anything.
REFUSED_UNAPPLIED = frozenset({_CODE.RESOURCE_EXHAUSTED})
# Also the outcome is unknown, which a repeat resolves for numbered steps and
# for calls that change nothing.
OUTCOME_UNKNOWN = frozenset({_CODE.UNAVAILABLE, _CODE.DEADLINE_EXCEEDED})
FOR_READS = REFUSED_UNAPPLIED | OUTCOME_UNKNOWN
FOR_NUMBERED_STEPS = FOR_READS | {_CODE.CANCELLED}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a client repeats a call that failed in a way that is safe to retry.

    Attempt n waits a random time (full jitter) of up to
    `min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))` before
    the next; no attempt starts after `deadline_s` from the first, and each
    attempt's own deadline ends there at the latest.
    """

    attempts: int = 8
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: expected at least 1, received {self.attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "expected 0 < initial_backoff_s <= max_backoff_s, received "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1 or self.deadline_s <= 0:
            raise ValueError("expected multiplier >= 1 and deadline_s > 0")

    def backoff_s(self, attempt: int) -> float:
        ceiling = self.initial_backoff_s * self.multiplier ** (attempt - 1)
        return random.uniform(0, min(self.max_backoff_s, ceiling))


DEFAULT_RETRIES = RetryPolicy()
NO_RETRIES = RetryPolicy(attempts=1)


def call(
    method: Callable,
    request,
    *,
    timeout_s: float | None,
    policy: RetryPolicy,
    retry_on: frozenset = frozenset(),
    metadata=None,
):
    """`method(request)`, repeated on the codes in `retry_on` within the policy;
    raises the typed error of the last attempt."""
    deadline = time.monotonic() + policy.deadline_s
    attempt = 0
    while True:
        attempt += 1
        remaining_s = deadline - time.monotonic()
        timeout = remaining_s if timeout_s is None else min(timeout_s, remaining_s)
        try:
            return method(request, timeout=max(timeout, 0.001), metadata=metadata)
        except grpc.RpcError as rpc_error:
            error: SeqServeError = from_rpc_error(rpc_error)
        pause_s = policy.backoff_s(attempt)
        last = attempt >= policy.attempts or time.monotonic() + pause_s >= deadline
        if error.code not in retry_on or last:
            raise error
        time.sleep(pause_s)
