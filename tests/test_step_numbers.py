"""Numbered steps apply once and in order; deadlines and cancellation are honoured.

The executor-level tests park the executor inside a step (FakeModel.hold) so
that what follows queues up behind it; the gRPC tests check statuses, the
machine-readable expected number, and exactness against Keras.
"""

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest

from seqserve.client import (
    Client,
    InvalidArgumentError,
    RetryPolicy,
    SeqServeError,
    StepOutOfOrderError,
    StepSkippedError,
    UnavailableError,
)
from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.errors import (
    EXPECTED_STEP_KEY,
    Cancelled,
    DeadlineExceeded,
    StepOutOfOrder,
)
from seqserve.server.servicer import SequenceServicer
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from conftest import running_server
from fake_model import FakeModel, chunk, reference
from lossy_channel import dropping_client
from rpc_helpers import refusal, stub_for, tensor
from small_models import (
    FEATURES,
    assert_matches_offline,
    frames,
    lstm_model,
    offline_outputs,
    offline_state,
    save_models,
)

WAIT_S = 10


@pytest.fixture
def fake_core():
    fake = FakeModel()
    core = SequenceCore({"fake": fake}, Config(port=0))
    core.start_session("fake", "blocker", None)
    core.start_session("fake", "s", None)
    yield core, fake
    fake.release()
    core.close()


def park(core, fake) -> threading.Thread:
    """Holds the executor inside a step of "blocker" until fake.release()."""
    fake.hold()
    busy = threading.Thread(target=core.step, args=("blocker", chunk(0.0)))
    busy.start()
    assert fake.entered.wait(WAIT_S)
    return busy


def test_queued_numbered_steps_apply_once_and_in_number_order(fake_core):
    core, fake = fake_core
    busy = park(core, fake)
    submit = core.submit_step
    first = submit("s", chunk(1.0), return_state=True, step_number=1)[1]
    repeat = submit("s", chunk(1.0), return_state=True, step_number=1)[1]
    gap = submit("s", chunk(5.0), step_number=3)[1]
    second = submit("s", chunk(2.0), return_state=True, step_number=2)[1]
    old = submit("s", chunk(7.0), step_number=1)[1]
    fake.release()
    busy.join(WAIT_S)

    (out_1, out_2), h = reference([chunk(1.0), chunk(2.0)])
    np.testing.assert_array_equal(first.result(WAIT_S).outputs[0], out_1)
    assert repeat.result(WAIT_S) == first.result(WAIT_S)  # the stored reply
    with pytest.raises(StepOutOfOrder) as refused:
        gap.result(WAIT_S)
    assert refused.value.expected == 2
    assert refused.value.trailing_metadata == ((EXPECTED_STEP_KEY, "2"),)
    assert second.result(WAIT_S).step_number == 2
    np.testing.assert_array_equal(second.result(WAIT_S).outputs[0], out_2)
    with pytest.raises(StepOutOfOrder) as refused:
        old.result(WAIT_S)  # 1 is no longer the last step: no stored reply for it
    assert refused.value.expected == 3
    _, state, timesteps, step_number = core.read_state("s")
    np.testing.assert_array_equal(state[0], h)
    assert (timesteps, step_number) == (2, 2)


@pytest.mark.parametrize("why", ["deadline", "cancelled"])
def test_a_step_whose_call_is_over_before_it_runs_is_not_applied(fake_core, why):
    core, fake = fake_core
    core.step("s", chunk(3.0), step_number=1)
    busy = park(core, fake)
    over = threading.Event()  # the call ends while the step waits
    limits = (
        {"deadline_s": time.monotonic() + 0.05}
        if why == "deadline"
        else {"cancelled": over.is_set}
    )
    _, future = core.submit_step("s", chunk(1.0), step_number=2, **limits)
    time.sleep(0.1)
    over.set()
    fake.release()
    busy.join(WAIT_S)

    expected = DeadlineExceeded if why == "deadline" else Cancelled
    with pytest.raises(expected):
        future.result(WAIT_S)
    _, state, timesteps, step_number = core.read_state("s")
    np.testing.assert_array_equal(state[0], reference([chunk(3.0)])[1])
    assert (timesteps, step_number) == (1, 1)
    # Not applied, so the same number applies now.
    assert core.step("s", chunk(1.0), step_number=2)[1].step_number == 2


def test_unnumbered_steps_and_step_many_count_too(fake_core):
    core, _ = fake_core
    assert core.step("s", chunk(1.0))[1].step_number == 1
    _, many = core.step_many(["s", "blocker"], np.zeros((2, 1, 1), np.float32))
    assert many.step_numbers == [2, 1]
    with pytest.raises(StepOutOfOrder):  # the last step was unnumbered: no reply kept
        core.step("s", chunk(1.0), step_number=2)
    assert core.step("s", chunk(1.0), step_number=3)[1].step_number == 3


@pytest.fixture(scope="module")
def keras_lstm():
    return lstm_model()


@pytest.fixture(scope="module")
def app(tmp_path_factory, keras_lstm):
    directory = save_models(tmp_path_factory.mktemp("numbers"), {"lstm": keras_lstm})
    with running_server(directory) as app:
        yield app


def numbered(session_id: str, x, number: int, **fields) -> pb.StepRequest:
    return pb.StepRequest(
        session_id=session_id, inputs=tensor(x), step_number=number, **fields
    )


def test_gap_and_old_numbers_are_refused_with_the_expected_number(app):
    rng = np.random.default_rng(1)
    x = frames(rng, 3)
    with stub_for(app) as stub:
        sid = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        first = stub.Step(numbered(sid, x, 1, return_state=True))
        again = stub.Step(numbered(sid, x, 1, return_state=True))
        gap = refusal(stub.Step, numbered(sid, x, 3))
        stub.Step(numbered(sid, x, 2))
        old = refusal(stub.Step, numbered(sid, x, 1))
        read = stub.GetState(pb.GetStateRequest(session_id=sid))

    assert again == first and first.step_number == 1
    for error, expected in ((gap, "2"), (old, "3")):
        assert error.code() == grpc.StatusCode.ABORTED
        assert dict(error.trailing_metadata())[EXPECTED_STEP_KEY] == expected
    assert (read.step_number, read.timesteps) == (2, 6)


def test_a_numbered_stream_refuses_a_gap_in_its_outcome(app):
    x = frames(np.random.default_rng(2), 2)
    with stub_for(app) as stub:
        sid = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        requests = [numbered(sid, x, n) for n in (1, 1, 3, 2)]
        outcomes = list(stub.StepStream(iter(requests), timeout=WAIT_S))

    assert outcomes[1].response == outcomes[0].response
    assert outcomes[2].error.code == grpc.StatusCode.ABORTED.value[0]
    assert outcomes[2].error.expected_step_number == 2
    assert outcomes[3].response.step_number == 2


def test_steps_whose_replies_are_lost_are_retried_and_apply_once(app, keras_lstm):
    sequence = frames(np.random.default_rng(3), 24)
    client, dropper = dropping_client(app, every=3)
    with client, client.start_session("lstm") as session:
        streamed = [session.step(c) for c in np.split(sequence, 8)]
        state = session.get_state()

    assert dropper.dropped >= 2 and session.step_number == 8
    assert_matches_offline(keras_lstm, sequence, streamed, state)


def test_the_client_reports_a_server_behind_with_the_expected_number(app):
    x = frames(np.random.default_rng(4), 2)
    with Client(f"127.0.0.1:{app.port}") as client:
        session = client.start_session("lstm")
        session.step(x)
        session.step(x)
        session.step_number = 5  # as if the server had lost steps 3 to 5
        with pytest.raises(StepOutOfOrderError) as behind:
            session.step(x)
        session.resume_from(behind.value.expected_step_number)
        session.step(x)

    assert behind.value.code == grpc.StatusCode.ABORTED
    assert behind.value.expected_step_number == 3 and behind.value.server_behind
    assert session.step_number == 3


@pytest.fixture
def fake_server(fake_core):
    """A gRPC server over the fake model's core, whose executor a test can hold."""
    core, fake = fake_core
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    pb_grpc.add_SequenceServiceServicer_to_server(SequenceServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.SequenceServiceStub(channel), fake
    server.stop(0)


@pytest.mark.parametrize("why", ["deadline", "cancelled"])
def test_a_call_over_before_its_step_runs_applies_nothing(fake_server, why):
    stub, fake = fake_server
    fake.hold()
    busy = stub.Step.future(numbered("blocker", chunk(0.0), 0), timeout=WAIT_S)
    assert fake.entered.wait(WAIT_S)
    call = stub.Step.future(numbered("s", chunk(1.0), 1), timeout=0.2)
    if why == "cancelled":
        call.cancel()
    with pytest.raises(
        grpc.FutureCancelledError if why == "cancelled" else grpc.RpcError
    ):
        call.result()
    time.sleep(0.1)  # the server sees the end of the call
    fake.release()
    busy.result()
    read = stub.GetState(pb.GetStateRequest(session_id="s"), timeout=WAIT_S)
    retried = stub.Step(numbered("s", chunk(1.0), 1), timeout=WAIT_S)

    if why == "deadline":
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (read.step_number, read.timesteps) == (0, 0)  # not applied
    assert retried.step_number == 1


def test_a_numbered_client_stream_and_unary_steps_share_one_count(app, keras_lstm):
    sequence = frames(np.random.default_rng(6), 12)
    chunks = np.split(sequence, 6)
    with Client(f"127.0.0.1:{app.port}") as client:
        session = client.start_session("lstm")
        streamed = [session.step(chunks[0])]
        pairs = [(session, c) for c in chunks[1:5]]
        streamed += list(client.step_stream(pairs, numbered=True))
        streamed.append(session.step(chunks[5]))

    assert session.step_number == 6
    np.testing.assert_allclose(
        np.concatenate(streamed), offline_outputs(keras_lstm, sequence), atol=1e-5
    )


def test_after_a_refused_stream_step_no_later_step_applies_until_a_resync(
    app, keras_lstm
):
    """A live generator: chunk 1, a refused step, then more chunks of the same
    session, some produced only once the refusal was seen."""
    sequence = frames(np.random.default_rng(7), 8)
    chunks = np.split(sequence, 4)
    wrong_width = np.ones((2, FEATURES + 1), np.float32)
    refusal_seen, resynced = threading.Event(), threading.Event()
    with Client(f"127.0.0.1:{app.port}") as client:
        session = client.start_session("lstm")

        def steps():
            yield session, chunks[0]
            yield session, wrong_width
            yield session, chunks[1]  # sent, or not yet, when the refusal comes
            refusal_seen.wait(WAIT_S)
            yield session, chunks[2]  # produced after the refusal
            resynced.wait(WAIT_S)
            yield from ((session, c) for c in chunks[1:])

        outcomes = []
        for outcome in client.step_stream(steps(), numbered=True):
            outcomes.append(outcome)
            if len(outcomes) == 2:
                refusal_seen.set()
            if len(outcomes) == 4:
                session.sync()
                resynced.set()
        state = session.get_state()

    assert isinstance(outcomes[1], InvalidArgumentError)
    assert [type(o) for o in outcomes[2:4]] == [StepSkippedError] * 2
    assert all(o.expected_step_number == 2 for o in outcomes[2:4])
    assert session.step_number == 4
    assert_matches_offline(keras_lstm, sequence, [outcomes[0], *outcomes[4:]], state)


def test_a_refusal_on_a_stream_holds_back_only_its_own_session(app, keras_lstm):
    rng = np.random.default_rng(12)
    sequences = [frames(rng, 8), frames(rng, 8)]
    chunks = [np.split(sequence, 4) for sequence in sequences]
    chunks[0][1] = np.full((2, 3), np.nan, np.float32)  # refused: not finite
    with Client(f"127.0.0.1:{app.port}") as client:
        held, going = client.start_session("lstm"), client.start_session("lstm")
        pairs = [
            (s, chunks[i][k]) for k in range(4) for i, s in enumerate((held, going))
        ]
        outcomes = list(client.step_stream(pairs, numbered=True))
        state = going.get_state()
        held.sync()

    assert isinstance(outcomes[2], InvalidArgumentError)
    assert [type(o) for o in outcomes[4::2]] == [StepSkippedError] * 2
    assert (held.step_number, going.step_number) == (1, 4)
    assert_matches_offline(keras_lstm, sequences[1], outcomes[1::2], state)


def test_a_stream_refusal_tells_that_the_server_is_behind(app):
    x = frames(np.random.default_rng(8), 2)
    with Client(f"127.0.0.1:{app.port}") as client:
        session = client.start_session("lstm")
        session.step(x)
        session.step(x)
        session.step_number = 5  # as if the server had lost steps 3 to 5
        (behind,) = client.step_stream([(session, x)], numbered=True)
        session.resume_from(behind.expected_step_number)
        (resumed,) = client.step_stream([(session, x)], numbered=True)

    assert isinstance(behind, StepOutOfOrderError) and behind.server_behind
    assert (behind.step_number, behind.expected_step_number) == (6, 3)
    assert isinstance(resumed, np.ndarray) and session.step_number == 3


ONE_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.001, max_backoff_s=0.001)


@pytest.mark.parametrize("lost", ["reply", "request"])
def test_the_same_inputs_after_an_unknown_outcome_apply_once(app, keras_lstm, lost):
    """Retries run out with the outcome unknown; the caller sends the same
    inputs again, whether the server had applied them or not."""
    sequence = frames(np.random.default_rng(9), 6)
    first, second = np.split(sequence, 2)
    client, dropper = dropping_client(app, every=10**9, retry=ONE_RETRY)
    with client, client.start_session("lstm") as session:
        dropper.losing = lost
        with pytest.raises(UnavailableError) as unknown:
            session.step(first)
        dropper.losing = None
        streamed = [session.step(first), session.step(second)]
        state = session.get_state()

    assert unknown.value.step_number == 1
    assert session.step_number == 2
    assert_matches_offline(keras_lstm, sequence, streamed, state)


def test_other_inputs_after_an_unknown_outcome_follow_the_applied_step(app, keras_lstm):
    sequence = frames(np.random.default_rng(10), 6)
    first, second = np.split(sequence, 2)
    client, dropper = dropping_client(app, every=10**9, retry=ONE_RETRY)
    with client, client.start_session("lstm") as session:
        dropper.losing = "reply"  # step 1 applies; its replies are lost
        with pytest.raises(UnavailableError):
            session.step(first)
        dropper.losing = None
        streamed = [session.step(second)]
        state = session.get_state()

    assert session.step_number == 2
    np.testing.assert_allclose(
        streamed[0], offline_outputs(keras_lstm, sequence)[3:], atol=1e-5
    )
    h, c = offline_state(keras_lstm, "lstm", sequence)
    np.testing.assert_allclose(state["lstm"]["h"], h, atol=1e-5)


def test_a_stream_whose_server_stops_while_the_generator_waits_raises(
    tmp_path, keras_lstm
):
    """A closed loop: the generator waits for each outcome before the next step;
    the server stops meanwhile. The caller hears of it at once."""
    directory = save_models(tmp_path, {"lstm": keras_lstm})
    answered, finished = threading.Event(), threading.Event()
    with running_server(directory) as app, Client(f"127.0.0.1:{app.port}") as client:
        session = client.start_session("lstm")

        def steps():
            yield session, frames(np.random.default_rng(11), 1)
            answered.wait(WAIT_S)
            finished.wait(WAIT_S)  # not set until the stream is over

        outcomes = client.step_stream(steps(), numbered=True)
        assert isinstance(next(outcomes), np.ndarray)
        app.stop(grace_s=0)
        answered.set()
        started_s = time.monotonic()
        with pytest.raises(SeqServeError):
            next(outcomes)
        waited_s = time.monotonic() - started_s
        finished.set()

    assert waited_s < WAIT_S / 2
