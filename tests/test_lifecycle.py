"""How sessions begin and end: ids, limits, idle expiry, counters, and the client."""

import re
import threading
import time

import grpc
import numpy as np
import pytest

from seqserve.client import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SeqServeError,
    UnavailableError,
)
from seqserve.client.errors import from_rpc_error
from seqserve.client.tensors import to_proto
from seqserve.server.app import App
from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.errors import NotFound
from seqserve.v1 import seqserve_pb2 as pb

from conftest import client_for, running_server
from fake_model import FakeModel, chunk
from rpc_helpers import refusal, stub_for
from small_models import embedding_model, frames, lstm_model, save_models

IDLE_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    models = {"lstm": lstm_model(), "tokens": embedding_model()}
    return save_models(tmp_path_factory.mktemp("lifecycle"), models)


@pytest.fixture(scope="module")
def client(model_dir):
    with running_server(model_dir) as app, client_for(app) as client:
        yield client


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(3)


def test_idle_session_expires_and_an_active_one_is_kept(model_dir, rng):
    with running_server(model_dir, idle_timeout_s=IDLE_TIMEOUT_S) as app:
        with client_for(app) as client, stub_for(app) as stub:
            idle = client.start_session("lstm")
            active = client.start_session("lstm")
            ended = client.start_session("lstm")
            ended.close()
            steps = 0
            # Past the latest expiry (1.25 times the timeout), stepping often
            # enough that a loaded machine does not make the active one look idle.
            deadline = time.monotonic() + 2.5 * IDLE_TIMEOUT_S
            while time.monotonic() < deadline:
                active.step(frames(rng, 1))
                steps += 1
                time.sleep(IDLE_TIMEOUT_S / 15)

            details = {}
            for name, session_id in [
                ("expired", idle.id),
                ("ended", ended.id),
                ("unknown", "never-started"),
            ]:
                error = refusal(
                    stub.GetState, pb.GetStateRequest(session_id=session_id)
                )
                assert error.code() == grpc.StatusCode.NOT_FOUND
                details[name] = error.details()
            active.get_state()
            assert active.timesteps == steps

    # The one requirement on message text: it tells the three cases apart.
    assert "expired" in details["expired"] and "ended by" not in details["expired"]
    assert "ended by the client" in details["ended"]
    assert "unknown" in details["unknown"]


@pytest.mark.parametrize(
    "idle_timeout_s, survives", [(0.0, True), (0.1, False)], ids=["zero", "0.1 s"]
)
def test_zero_idle_timeout_is_off(idle_timeout_s, survives):
    core = SequenceCore(
        {"fake": FakeModel()}, Config(idle_timeout_s=idle_timeout_s, port=0)
    )
    try:
        session, _ = core.start_session("fake", "s", None)
        time.sleep(0.6)
        if survives:
            core.step("s", chunk(1.0))
        else:
            with pytest.raises(NotFound, match="expired"):
                core.step("s", chunk(1.0))
    finally:
        core.close()


def test_a_session_is_not_usable_before_its_start_returns():
    # Between registering an id and queuing its start, a call naming the id
    # could reach the executor first and touch a state row that is not its own.
    fake = FakeModel()
    core = SequenceCore({"fake": fake}, Config(port=0))
    try:
        core.start_session("fake", "blocker", None)
        fake.hold()
        busy = threading.Thread(target=core.step, args=("blocker", chunk(1.0)))
        busy.start()
        assert fake.entered.wait(10)
        starting = threading.Thread(target=core.start_session, args=("fake", "p", None))
        starting.start()
        while len(core.sessions) < 2:  # "p" is registered; its start is queued
            time.sleep(0.01)

        with pytest.raises(NotFound, match="unknown"):
            core.step("p", chunk(1.0))
        with pytest.raises(NotFound, match="unknown"):
            core.end_session("p")

        fake.release()
        busy.join(10)
        starting.join(10)
        assert core.step("p", chunk(1.0))[1].timesteps == 1
    finally:
        fake.release()
        core.close()


def test_max_sessions_refuses_at_once_until_one_ends(model_dir):
    with running_server(model_dir, max_sessions=3) as app, client_for(app) as client:
        sessions = [client.start_session("lstm") for _ in range(3)]

        began = time.perf_counter()
        with pytest.raises(ResourceExhaustedError) as caught:
            client.start_session("lstm")
        assert time.perf_counter() - began < 2.0  # refused, not queued
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(ResourceExhaustedError):
            client.start_session("tokens", session_id="proposed")
        with pytest.raises(AlreadyExistsError):
            client.start_session("lstm", session_id=sessions[0].id)

        sessions.pop().close()
        replacement = client.start_session("lstm", session_id="proposed")
        assert replacement.id == "proposed"


def test_proposed_ids_are_kept_and_minted_ones_are_unguessable(client):
    assert client.start_session("lstm", session_id="user-7:cam.2").id == "user-7:cam.2"
    minted = [client.start_session("lstm") for _ in range(32)]
    ids = [s.id for s in minted]
    assert len(set(ids)) == len(ids)
    # 24 characters of a 64-letter alphabet: 144 random bits.
    assert all(len(i) >= 24 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    for session in minted:
        session.close()


def test_ended_session_refuses_every_call(client, rng):
    session = client.start_session("lstm")
    session.step(frames(rng, 2))
    session.close()
    assert session.timesteps == 2
    for call in (
        lambda: session.step(frames(rng, 1)),
        session.get_state,
        session.reset,
        session.close,
    ):
        with pytest.raises(NotFoundError) as caught:
            call()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_session_context_manager_ends_the_session(client, rng):
    with client.start_session("lstm") as session:
        session.step(frames(rng, 3))
    assert session.timesteps == 3
    with pytest.raises(NotFoundError):
        session.get_state()

    with pytest.raises(KeyError), client.start_session("lstm") as failing:
        raise KeyError("the caller's own error")
    with pytest.raises(NotFoundError):
        failing.get_state()

    with client.start_session("lstm") as closed_inside:
        closed_inside.close()  # the exit finds it gone and says nothing


def test_timesteps_count_since_start_reset_or_set(client, rng):
    session = client.start_session("lstm")

    def counted() -> int:
        session.get_state()  # the server's count, not the client's last copy
        return session.timesteps

    counts = [counted()]
    session.step(frames(rng, 3))
    counts.append(counted())
    session.step(frames(rng, 2))
    counts.append(counted())
    state = session.get_state()
    session.reset()
    counts.append(counted())
    session.step(frames(rng, 4))
    session.set_state(state)
    counts.append(counted())
    session.step(frames(rng, 2), reset=True)
    counts.append(counted())
    session.step(frames(rng, 3), state=state)
    counts.append(counted())
    session.close()
    counts.append(session.timesteps)  # as EndSession reports it
    assert counts == [0, 3, 5, 0, 0, 2, 3, 3]


def test_client_casts_within_a_kind_but_never_wraps_integers(client, rng):
    x = frames(rng, 3)
    with client.start_session("lstm") as a, client.start_session("lstm") as b:
        np.testing.assert_array_equal(a.step(x.astype(np.float64)), b.step(x))
    with client.start_session("tokens") as tokens:
        tokens.step(np.array([1, 2], np.int64))
        tokens.step([3, 4])
        before = tokens.get_state()
        with pytest.raises(InvalidArgumentError) as caught:
            tokens.step(np.array([2**32 + 1], np.int64))  # would wrap to token 1
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        after = tokens.get_state()
    np.testing.assert_array_equal(after["gru"]["h"], before["gru"]["h"])
    with client.start_session("lstm") as session:
        for never_cast in (x.astype(np.int32), np.full((1, 3), 1e300)):
            with pytest.raises(InvalidArgumentError):  # int to float; float32 overflow
                session.step(never_cast)
        assert not session.get_state()["lstm"]["h"].any()


def test_client_raises_typed_errors_by_status_code(client):
    with pytest.raises(NotFoundError):
        client.start_session("no_such_model")
    with client.start_session("lstm", session_id="typed") as session:
        with pytest.raises(AlreadyExistsError):
            client.start_session("lstm", session_id="typed")
        with pytest.raises(InvalidArgumentError):
            session.step(np.zeros((2, 4), np.float32))
        with pytest.raises(InvalidArgumentError):
            session.set_state({"lstm": {"h": np.zeros(5, np.float32)}})


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "detail"


@pytest.mark.parametrize(
    "code, expected",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, SeqServeError),
        (grpc.StatusCode.CANCELLED, CancelledError),
        (grpc.StatusCode.ABORTED, SeqServeError),  # without an expected step number
    ],
)
def test_status_codes_map_to_exception_types(code, expected):
    error = from_rpc_error(FakeRpcError(code))
    assert type(error) is expected
    assert (error.code, error.details) == (code, "detail")


def test_session_starts_from_a_given_state(client):
    given = {
        "lstm": {
            "h": np.linspace(-1, 1, 5, dtype=np.float32),
            "c": np.linspace(2, 3, 5, dtype=np.float32),
        }
    }
    with client.start_session("lstm", state=given) as session:
        state = session.get_state()
        assert session.timesteps == 0
    for part in ("h", "c"):
        assert state["lstm"][part].dtype == np.float32
        np.testing.assert_array_equal(state["lstm"][part], given["lstm"][part])


def test_more_timesteps_than_the_limit_are_refused(tmp_path_factory):
    directory = tmp_path_factory.mktemp("limit")
    save_models(directory, {"lstm": lstm_model()})
    with running_server(directory, max_timesteps=5) as app, client_for(app) as client:
        session = client.start_session("lstm")
        rng = np.random.default_rng(0)
        session.step(frames(rng, 5))
        with pytest.raises(InvalidArgumentError):
            session.step(frames(rng, 6))
        session.get_state()
        assert session.timesteps == 5


def test_a_second_server_on_a_port_in_use_fails_to_start(tmp_path_factory):
    directory = tmp_path_factory.mktemp("port")
    save_models(directory, {"lstm": lstm_model()})
    with running_server(directory) as first:
        with pytest.raises(RuntimeError):
            App(Config(model_dir=directory, port=first.port))


def test_cancelled_streams_give_their_worker_threads_back(tmp_path_factory):
    # A stream the client drops must not keep a worker thread waiting forever:
    # with two workers, three dropped streams would otherwise stop the server.
    directory = tmp_path_factory.mktemp("streams")
    save_models(directory, {"lstm": lstm_model()})
    with running_server(directory, worker_threads=2) as app, stub_for(app) as stub:
        session_id = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        step = pb.StepRequest(
            session_id=session_id,
            inputs=to_proto(frames(np.random.default_rng(0), 1)),
        )
        done = threading.Event()

        def one_step_then_wait():
            yield step
            done.wait(30)  # the client keeps the stream open, then drops it

        for _ in range(3):
            replies = stub.StepStream(one_step_then_wait(), timeout=30)
            next(replies)
            replies.cancel()
        time.sleep(1.5)  # the streams notice the cancellation within 0.5 s
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        done.set()
