"""RetryPolicy and retries.call, against fake stubs and a fake clock: which
statuses are retried for which calls, backoff and jitter, the overall deadline.
Nothing here sleeps or opens a connection."""

import random

import grpc
import numpy as np
import pytest

from seqserve.client import (
    Client,
    InvalidArgumentError,
    ModelInfo,
    RetryPolicy,
    SeqServeError,
    Session,
    TensorInfo,
    UnavailableError,
    retries,
)
from seqserve.v1 import seqserve_pb2 as pb

CODE = grpc.StatusCode


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "injected by the test"

    def trailing_metadata(self):
        return ()


class FakeClock:
    """Stands in for the `time` module in retries: sleeping moves it on."""

    def __init__(self):
        self.now_s = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


class Method:
    """A stub method that fails with `codes` in turn, then returns `reply`;
    each attempt takes `takes_s` on the clock."""

    def __init__(self, clock, codes, reply="reply", takes_s=0.0):
        self.clock, self.codes, self.reply = clock, list(codes), reply
        self.takes_s = takes_s
        self.starts_s: list[float] = []
        self.timeouts: list[float] = []
        self.requests: list = []

    @property
    def calls(self) -> int:
        return len(self.starts_s)

    def __call__(self, request, *, timeout, metadata):
        self.starts_s.append(self.clock.now_s)
        self.timeouts.append(timeout)
        self.requests.append((request, metadata))
        self.clock.now_s += self.takes_s
        if self.codes:
            code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
            if code is not None:
                raise Failure(code)
        return self.reply


class Ceiling:
    """Stands in for `random` in retries: full jitter at its top."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return high


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(retries, "time", fake)
    return fake


def always(code, clock, **fields):
    return Method(clock, [code], **fields)


QUICK = RetryPolicy(attempts=5, initial_backoff_s=0.01, max_backoff_s=0.1)


@pytest.mark.parametrize("code", [c for c in CODE if c != CODE.OK])
@pytest.mark.parametrize(
    "retry_on",
    [retries.REFUSED_UNAPPLIED, retries.FOR_READS, retries.FOR_NUMBERED_STEPS],
    ids=["refused-unapplied", "reads", "numbered-steps"],
)
def test_only_the_codes_a_call_is_safe_to_repeat_on_are_retried(clock, code, retry_on):
    method = always(code, clock)
    with pytest.raises(SeqServeError) as caught:
        retries.call(method, "req", timeout_s=1, policy=QUICK, retry_on=retry_on)

    assert caught.value.code == code
    assert method.calls == (QUICK.attempts if code in retry_on else 1)


def test_the_code_sets_say_what_is_safe():
    assert retries.REFUSED_UNAPPLIED == {CODE.RESOURCE_EXHAUSTED}
    assert retries.FOR_READS == {
        CODE.RESOURCE_EXHAUSTED,
        CODE.UNAVAILABLE,
        CODE.DEADLINE_EXCEEDED,
    }
    assert retries.FOR_NUMBERED_STEPS == retries.FOR_READS | {CODE.CANCELLED}


def test_a_call_that_succeeds_after_failures_returns_its_reply(clock):
    method = Method(clock, [CODE.UNAVAILABLE, CODE.RESOURCE_EXHAUSTED, None])
    reply = retries.call(
        method, "req", timeout_s=1, policy=QUICK, retry_on=retries.FOR_READS
    )

    assert (reply, method.calls, len(clock.sleeps)) == ("reply", 3, 2)


def test_backoff_grows_by_the_multiplier_up_to_its_maximum(clock, monkeypatch):
    monkeypatch.setattr(retries, "random", Ceiling)
    policy = RetryPolicy(
        attempts=7, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=3.0
    )
    with pytest.raises(UnavailableError):
        retries.call(
            always(CODE.UNAVAILABLE, clock),
            "req",
            timeout_s=None,
            policy=policy,
            retry_on=retries.FOR_READS,
        )

    np.testing.assert_allclose(clock.sleeps, [0.1, 0.3, 0.9, 1.0, 1.0, 1.0])


def test_jitter_is_full_between_zero_and_the_ceiling(monkeypatch):
    monkeypatch.setattr(retries, "random", random.Random(5))
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=2.0)
    for attempt, ceiling in ((1, 0.05), (3, 0.2), (12, 2.0)):
        pauses = np.array([policy.backoff_s(attempt) for _ in range(2000)])
        assert pauses.min() >= 0 and pauses.max() <= ceiling
        assert pauses.min() < 0.05 * ceiling and pauses.max() > 0.95 * ceiling
        assert abs(pauses.mean() - ceiling / 2) < 0.05 * ceiling


@pytest.mark.parametrize("timeout_s", [3.0, None])
def test_no_attempt_starts_after_the_deadline_and_none_outlives_it(
    clock, monkeypatch, timeout_s
):
    """Attempts of 1 s, pauses of 0.5 s, a deadline of 10 s: attempts start at
    0, 1.5, ..., 9 s, the last with only 1 s left."""
    monkeypatch.setattr(retries, "random", Ceiling)
    policy = RetryPolicy(
        attempts=1000, initial_backoff_s=0.5, max_backoff_s=0.5, deadline_s=10
    )
    start_s = clock.now_s
    method = always(CODE.DEADLINE_EXCEEDED, clock, takes_s=1.0)
    with pytest.raises(SeqServeError):
        retries.call(
            method, "r", timeout_s=timeout_s, policy=policy, retry_on=retries.FOR_READS
        )

    starts_s = np.array(method.starts_s) - start_s
    np.testing.assert_allclose(starts_s, np.arange(0, 9.1, 1.5))
    left_s = policy.deadline_s - starts_s
    np.testing.assert_allclose(method.timeouts, np.minimum(timeout_s or 60, left_s))
    assert clock.now_s - start_s <= policy.deadline_s


def test_policies_refuse_bad_settings():
    for bad in (
        {"attempts": 0},
        {"initial_backoff_s": 0},
        {"initial_backoff_s": 3, "max_backoff_s": 2},
        {"multiplier": 0.5},
        {"deadline_s": 0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


class FakeStub:
    """Every method fails with `code`; counts the calls of each."""

    def __init__(self, clock, code):
        self.methods = {}
        self.clock, self.code = clock, code

    def __getattr__(self, name):
        return self.methods.setdefault(name, always(self.code, self.clock))


MODEL = ModelInfo(
    name="m",
    input=TensorInfo("x", np.dtype(np.float32), (-1, 3)),
    outputs=(TensorInfo("y", np.dtype(np.float32), (-1, 2)),),
    state=(),
    outputs_per_timestep=True,
)


@pytest.fixture
def client_with(clock):
    """Makes clients, never connected, whose stub answers every call with `code`."""
    made = []

    def make(code=CODE.UNAVAILABLE, **options):
        made.append(Client("127.0.0.1:1", retry=QUICK, **options))
        made[-1]._stub = FakeStub(clock, code)
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_unnumbered_steps_and_calls_that_are_not_idempotent_are_not_retried(
    client_with,
):
    client = client_with(numbered_steps=False)
    session = Session(client, "s", MODEL)
    calls = [
        lambda: session.step(np.zeros((1, 3), np.float32)),
        lambda: client.step_many([session], np.zeros((1, 1, 3), np.float32)),
        lambda: client.start_session("m"),
        lambda: client.import_session(b"exported"),
        session.close,
    ]
    for call in calls:
        with pytest.raises(UnavailableError):
            call()

    methods = client._stub.methods
    assert {name: m.calls for name, m in methods.items()} == {
        "Step": 1,
        "StepMany": 1,
        "StartSession": 1,
        "ImportSession": 1,
        "EndSession": 1,
    }


def test_numbered_steps_and_reads_are_retried_on_unavailable(client_with):
    client = client_with()
    session = Session(client, "s", MODEL)
    for call in (
        lambda: session.step(np.zeros((1, 3), np.float32)),
        session.get_state,
        client.list_models,
    ):
        with pytest.raises(UnavailableError):
            call()

    methods = client._stub.methods
    assert methods["Step"].calls == QUICK.attempts
    assert methods["GetState"].calls == QUICK.attempts
    assert methods["ListModels"].calls == QUICK.attempts


def test_a_refusal_for_a_bad_request_is_never_retried(client_with, clock):
    client = client_with(CODE.INVALID_ARGUMENT)
    with pytest.raises(InvalidArgumentError):
        Session(client, "s", MODEL).step(np.zeros((1, 3), np.float32))

    assert client._stub.methods["Step"].calls == 1
    assert clock.sleeps == []


def test_a_request_is_sent_again_unchanged(clock):
    method = Method(clock, [CODE.UNAVAILABLE, CODE.UNAVAILABLE, None])
    request = pb.StepRequest(session_id="s", step_number=4)
    metadata = (("authorization", "Bearer t"),)
    retries.call(
        method,
        request,
        timeout_s=1,
        policy=QUICK,
        retry_on=retries.FOR_NUMBERED_STEPS,
        metadata=metadata,
    )

    assert method.requests == [(request, metadata)] * 3
