"""The executor's batching and ordering, with a fake model that records batches."""

import threading
import time

import numpy as np
import pytest

from seqserve.server.errors import NotFound, Unavailable
from seqserve.server.executor import ModelExecutor, StateOp, StepOp
from seqserve.server.sessions import Session

from fake_model import POISON, FakeModel, chunk, reference

WAIT_S = 10


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def executor(fake):
    executor = ModelExecutor(fake, max_batch_size=8)
    yield executor
    fake.release()
    executor.close()


def start(executor, session_id: str) -> Session:
    session = Session(session_id, "fake", created_s=0.0, last_used_s=0.0)
    executor.submit(StateOp("start", session)).result(WAIT_S)
    return session


def step(executor, session, x, *, state=None, reset=False):
    return executor.submit(StepOp(session, x, state, reset, return_state=True))


def hold(executor, fake) -> None:
    """Parks the executor inside a step, so what follows queues up behind it."""
    blocker = start(executor, "blocker")
    fake.hold()
    # An idle executor runs a step in the submitting thread, so submit from another.
    threading.Thread(target=step, args=(executor, blocker, chunk(0))).start()
    assert fake.entered.wait(WAIT_S)


def assert_result(result, expected_outputs, expected_h, timesteps):
    np.testing.assert_array_equal(result.outputs[0], expected_outputs)
    np.testing.assert_array_equal(result.state[0], expected_h)
    assert result.timesteps == timesteps


def test_a_lone_step_runs_at_once(executor, fake):
    session = start(executor, "s")
    began = time.perf_counter()
    result = step(executor, session, chunk(1, 2, 3)).result(WAIT_S)
    # Generous: the point is that nothing waits for a batch to fill.
    assert time.perf_counter() - began < 1.0
    assert fake.batches == [(1, 3)]
    (expected,), h = reference([chunk(1, 2, 3)])
    assert_result(result, expected, h, timesteps=3)


def test_equal_length_steps_of_different_sessions_share_a_batch(executor, fake):
    sessions = [start(executor, f"s{i}") for i in range(7)]
    lengths = [2, 2, 3, 2, 3, 2, 2]
    inputs = [chunk(*range(i, i + n)) for i, n in enumerate(lengths)]
    hold(executor, fake)

    futures = [step(executor, s, x) for s, x in zip(sessions, inputs)]
    fake.release()

    results = [f.result(WAIT_S) for f in futures]
    assert sorted(fake.batches[1:]) == [(2, 3), (5, 2)]
    for x, result in zip(inputs, results):
        (expected,), h = reference([x])
        assert_result(result, expected, h, timesteps=len(x))


def test_a_session_is_never_twice_in_a_batch_and_keeps_its_order(executor, fake):
    a, b = start(executor, "a"), start(executor, "b")
    a_chunks = [chunk(1, 2), chunk(3, 4), chunk(5, 6)]
    hold(executor, fake)

    first = step(executor, a, a_chunks[0])
    other = step(executor, b, chunk(7, 8))
    later = [step(executor, a, x) for x in a_chunks[1:]]
    fake.release()

    results = [f.result(WAIT_S) for f in [first, *later]]
    other.result(WAIT_S)
    assert fake.batches[1:] == [(2, 2), (1, 2), (1, 2)]
    expected, h = reference(a_chunks)
    for result, outputs_, timesteps in zip(results, expected, [2, 4, 6]):
        np.testing.assert_array_equal(result.outputs[0], outputs_)
        assert result.timesteps == timesteps
    np.testing.assert_array_equal(results[-1].state[0], h)


def test_batches_hold_at_most_max_batch_size(fake):
    executor = ModelExecutor(fake, max_batch_size=2)
    try:
        sessions = [start(executor, f"s{i}") for i in range(5)]
        hold(executor, fake)
        futures = [step(executor, s, chunk(i, i)) for i, s in enumerate(sessions)]
        fake.release()
        for future in futures:
            assert future.result(WAIT_S).timesteps == 2
        assert fake.batches[1:] == [(2, 2), (2, 2), (1, 2)]
    finally:
        fake.release()
        executor.close()


def test_state_operations_apply_in_submission_order(executor, fake):
    session = start(executor, "s")
    eight = np.full(2, 8.0, np.float32)
    hold(executor, fake)

    stepped = step(executor, session, chunk(4, 2))
    read_after_step = executor.submit(StateOp("read", session))
    executor.submit(StateOp("write", session, [eight]))
    from_eight = step(executor, session, chunk(1))
    read_after_write = executor.submit(StateOp("read", session))
    fake.release()

    (first,), h = reference([chunk(4, 2)])
    assert_result(stepped.result(WAIT_S), first, h, timesteps=2)
    (values,), timesteps, step_number = read_after_step.result(WAIT_S)
    np.testing.assert_array_equal(values, h)
    assert (timesteps, step_number) == (2, 1)
    (second,), h = reference([chunk(1)], start=eight)
    assert_result(from_eight.result(WAIT_S), second, h, timesteps=1)
    (values,), timesteps, step_number = read_after_write.result(WAIT_S)
    np.testing.assert_array_equal(values, h)
    # A write starts the timesteps over, not the step count.
    assert (timesteps, step_number) == (1, 2)


def test_reset_and_explicit_state_start_the_step_over(executor):
    session = start(executor, "s")
    step(executor, session, chunk(5, 5)).result(WAIT_S)

    reset = step(executor, session, chunk(2), reset=True).result(WAIT_S)
    given = [np.array([4.0, -4.0], np.float32)]
    explicit = step(executor, session, chunk(2), state=given).result(WAIT_S)

    (expected,), h = reference([chunk(2)])
    assert_result(reset, expected, h, timesteps=1)
    (expected,), h = reference([chunk(2)], start=given[0])
    assert_result(explicit, expected, h, timesteps=1)


def test_a_failing_step_fails_alone_and_changes_nothing(executor, fake):
    good, bad, other = (start(executor, name) for name in ("good", "bad", "other"))
    step(executor, bad, chunk(3)).result(WAIT_S)
    hold(executor, fake)

    futures = [
        step(executor, good, chunk(1, 2)),
        step(executor, bad, chunk(1, POISON)),
        step(executor, other, chunk(3, 4)),
    ]
    fake.release()

    assert isinstance(futures[1].exception(WAIT_S), ValueError)
    assert fake.batches[2] == (3, 2)  # tried together first, then one by one
    for future, x in ((futures[0], chunk(1, 2)), (futures[2], chunk(3, 4))):
        (expected,), h = reference([x])
        assert_result(future.result(WAIT_S), expected, h, timesteps=2)
    (values,), timesteps, _ = executor.submit(StateOp("read", bad)).result(WAIT_S)
    np.testing.assert_array_equal(values, reference([chunk(3)])[1])
    assert timesteps == 1


def test_steps_after_release_are_not_found(executor):
    session = start(executor, "s")
    executor.submit(StateOp("release", session)).result(WAIT_S)
    with pytest.raises(NotFound):
        step(executor, session, chunk(1)).result(WAIT_S)
    with pytest.raises(NotFound):
        executor.submit(StateOp("read", session)).result(WAIT_S)


def test_close_finishes_submitted_work_then_refuses_more(fake):
    executor = ModelExecutor(fake, max_batch_size=4)
    session = start(executor, "s")
    hold(executor, fake)
    futures = [step(executor, session, chunk(i)) for i in range(3)]

    closer = threading.Thread(target=executor.close)
    closer.start()
    fake.release()
    closer.join(WAIT_S)

    assert not closer.is_alive()
    assert [f.result(0).timesteps for f in futures] == [1, 2, 3]
    with pytest.raises(Unavailable):
        step(executor, session, chunk(1))


def test_sessions_past_the_initial_capacity_keep_their_own_state(executor):
    sessions = [start(executor, f"s{i}") for i in range(150)]
    futures = [step(executor, s, chunk(i % 7, i)) for i, s in enumerate(sessions)]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(
            future.result(WAIT_S).state[0], reference([chunk(i % 7, i)])[1]
        )


def test_with_a_maximum_wait_a_lone_session_still_runs_at_once(fake):
    executor = ModelExecutor(fake, max_batch_size=8, max_batch_wait_ms=5_000)
    try:
        session = start(executor, "alone")
        began = time.perf_counter()
        for value in range(3):
            step(executor, session, chunk(value)).result(WAIT_S)
        # Each step would wait 5 s if the executor waited for a batch to fill.
        assert time.perf_counter() - began < 2.0
    finally:
        executor.close()


def test_with_a_maximum_wait_steps_arriving_apart_share_a_batch(fake):
    executor = ModelExecutor(fake, max_batch_size=8, max_batch_wait_ms=2_000)
    try:
        first, second = start(executor, "a"), start(executor, "b")
        # Teach the executor to expect two operations at a time.
        executor._last_collected = 2
        hold(executor, fake)
        pending = [step(executor, first, chunk(1))]
        fake.release()  # the executor's thread now collects the first step alone
        time.sleep(0.2)  # well inside the wait, far outside a drain of the queue
        pending.append(step(executor, second, chunk(2)))
        for future in pending:
            future.result(WAIT_S)
        assert fake.batches[1:] == [(2, 1)]
    finally:
        executor.close()


def test_an_idle_executor_runs_a_step_in_the_submitting_thread(executor, fake):
    session = start(executor, "alone")
    future = step(executor, session, chunk(3))
    # Done on return: no other thread was involved, so no handoff was paid.
    assert future.done()
    assert fake.batches == [(1, 1)]
