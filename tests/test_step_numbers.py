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

from seqserve.client import Client, StepOutOfOrderError
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
from small_models import frames, lstm_model, offline_outputs, offline_state, save_models

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
        state = session.get_state()["lstm"]

    assert dropper.dropped >= 2 and session.step_number == 8
    np.testing.assert_allclose(
        np.concatenate(streamed), offline_outputs(keras_lstm, sequence), atol=1e-5
    )
    h, c = offline_state(keras_lstm, "lstm", sequence)
    np.testing.assert_allclose(state["h"], h, atol=1e-5)
    np.testing.assert_allclose(state["c"], c, atol=1e-5)


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
