"""StepMany and StepStream: exact against Keras, ordered, and strict."""

import threading

import grpc
import numpy as np
import pytest

from seqserve.client import InvalidArgumentError, NotFoundError
from seqserve.v1 import seqserve_pb2 as pb

import small_models
from conftest import client_for, running_server
from rpc_helpers import stub_for, tensor

SESSIONS = 12
TIMESTEPS = 40


@pytest.fixture(scope="module")
def lstm():
    return small_models.lstm_model()


# With states in host arrays, and in TensorFlow variables as on a GPU.
@pytest.fixture(scope="module", params=["host", "tensorflow"])
def app(request, tmp_path_factory, lstm):
    directory = tmp_path_factory.mktemp("models")
    models = {"lstm": lstm, "gru": small_models.gru_model()}
    model_dir = small_models.save_models(directory, models)
    with running_server(model_dir, state_storage=request.param) as app:
        yield app


@pytest.fixture()
def client(app):
    with client_for(app) as client:
        yield client


def sequences(seed: int, count: int = SESSIONS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([small_models.frames(rng, TIMESTEPS) for _ in range(count)])


def chunk_lengths(seed: int) -> list[int]:
    """Random lengths that add up to TIMESTEPS."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, TIMESTEPS), size=6, replace=False))
    return np.diff([0, *cuts, TIMESTEPS]).tolist()


def test_step_many_equals_offline_keras_for_every_session(client, lstm):
    x = sequences(0)
    sessions = [client.start_session("lstm") for _ in range(SESSIONS)]
    streamed, start = [], 0
    for length in chunk_lengths(1):
        streamed.append(client.step_many(sessions, x[:, start : start + length]))
        start += length
    streamed = np.concatenate(streamed, axis=1)

    for row, session in enumerate(sessions):
        expected = small_models.offline_outputs(lstm, x[row])
        np.testing.assert_allclose(streamed[row], expected, atol=1e-5)
        assert session.timesteps == TIMESTEPS
        state = session.get_state()["lstm"]
        h, c = small_models.offline_state(lstm, "lstm", x[row])
        np.testing.assert_allclose(state["h"], h, atol=1e-5)
        np.testing.assert_allclose(state["c"], c, atol=1e-5)


def test_step_many_interleaved_with_unary_steps_keeps_each_session_in_order(
    client, lstm
):
    x = sequences(2, count=4)
    sessions = [client.start_session("lstm") for _ in range(4)]
    outputs = [[] for _ in sessions]
    for t in range(0, TIMESTEPS, 2):
        both = client.step_many(sessions, x[:, t : t + 1])
        for row, session in enumerate(sessions):
            outputs[row].append(both[row])
            outputs[row].append(session.step(x[row, t + 1 : t + 2]))
    for row in range(len(sessions)):
        expected = small_models.offline_outputs(lstm, x[row])
        np.testing.assert_allclose(np.concatenate(outputs[row]), expected, atol=1e-5)


def test_step_many_refuses_the_whole_request_and_changes_no_state(client, app):
    sessions = [client.start_session("lstm") for _ in range(3)]
    before = [s.get_state()["lstm"]["h"] for s in sessions]
    ended = client.start_session("lstm")
    ended.close()
    x = sequences(3, count=4)[:, :5]

    with pytest.raises(NotFoundError):
        client.step_many([*sessions, ended], x)
    with pytest.raises(InvalidArgumentError):  # the same session twice
        client.step_many([sessions[0], sessions[1], sessions[0]], x[:3])
    with pytest.raises(InvalidArgumentError):  # rows disagree with sessions
        client.step_many(sessions, x)
    other = client.start_session("gru")
    with pytest.raises(InvalidArgumentError):  # sessions of two models
        client.step_many([*sessions, other], x)
    poisoned = x[:3].copy()
    poisoned[2, 4, 0] = np.nan
    with pytest.raises(InvalidArgumentError):
        client.step_many(sessions, poisoned)

    after = [s.get_state()["lstm"]["h"] for s in sessions]
    for h_before, h_after in zip(before, after):
        np.testing.assert_array_equal(h_before, h_after)
    assert [s.timesteps for s in sessions] == [0, 0, 0]


def test_stream_of_many_sessions_equals_offline_keras(client, lstm):
    x = sequences(4)
    sessions = [client.start_session("lstm") for _ in range(SESSIONS)]
    plans = [chunk_lengths(10 + row) for row in range(SESSIONS)]
    steps, cursor = [], [0] * SESSIONS
    # Round-robin over sessions, each with its own chunking.
    for index in range(max(len(p) for p in plans)):
        for row, plan in enumerate(plans):
            if index < len(plan):
                start = cursor[row]
                steps.append((row, x[row, start : start + plan[index]]))
                cursor[row] += plan[index]

    replies = client.step_stream((sessions[row], chunk) for row, chunk in steps)
    streamed = [[] for _ in sessions]
    for (row, _), reply in zip(steps, replies):
        assert isinstance(reply, np.ndarray), reply
        streamed[row].append(reply)

    for row in range(SESSIONS):
        expected = small_models.offline_outputs(lstm, x[row])
        np.testing.assert_allclose(np.concatenate(streamed[row]), expected, atol=1e-5)


def test_stream_answers_a_refused_step_and_goes_on(client, lstm):
    session = client.start_session("lstm")
    x = sequences(5, count=1)[0]
    bad = np.zeros((1, small_models.FEATURES + 1), np.float32)
    steps = [(session, x[:3]), (session, bad), (session, x[3:7])]

    replies = list(client.step_stream(steps))

    assert isinstance(replies[1], InvalidArgumentError)
    streamed = np.concatenate([replies[0], replies[2]])
    expected = small_models.offline_outputs(lstm, x[:7])
    np.testing.assert_allclose(streamed, expected, atol=1e-5)
    assert session.timesteps == 7


def test_streams_from_several_threads_keep_every_session_exact(client, lstm):
    x = sequences(6, count=8)
    sessions = [client.start_session("lstm") for _ in range(8)]
    results: dict[int, np.ndarray] = {}

    def drive(row: int) -> None:
        steps = ((sessions[row], x[row, t : t + 1]) for t in range(TIMESTEPS))
        results[row] = np.concatenate(list(client.step_stream(steps)))

    threads = [threading.Thread(target=drive, args=(row,)) for row in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for row in range(8):
        expected = small_models.offline_outputs(lstm, x[row])
        np.testing.assert_allclose(results[row], expected, atol=1e-5)


def test_raw_step_many_with_an_unknown_session_names_the_item(app):
    with stub_for(app) as stub:
        known = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        request = pb.StepManyRequest(
            session_ids=[known, "nobody-here"],
            inputs=tensor(np.zeros((2, 1, small_models.FEATURES), np.float32)),
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.StepMany(request)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "session_ids[1]" in refused.value.details()


def test_a_stream_of_one_session_that_adds_others_keeps_each_exact(client, lstm):
    """The stream's first session steps alone (answered on the stream's own
    thread), then two more join in (a reader thread takes over)."""
    x = sequences(7, count=3)
    sessions = [client.start_session("lstm") for _ in range(3)]
    alone = 10
    order = [(0, t) for t in range(alone)]
    for t in range(TIMESTEPS):
        order += [(row, t) for row in (1, 2)] + ([(0, t)] if t >= alone else [])

    replies = client.step_stream((sessions[row], x[row, t : t + 1]) for row, t in order)
    streamed = [[] for _ in sessions]
    for (row, _), reply in zip(order, replies, strict=True):
        assert isinstance(reply, np.ndarray), reply
        streamed[row].append(reply)

    for row in range(3):
        expected = small_models.offline_outputs(lstm, x[row])
        np.testing.assert_allclose(np.concatenate(streamed[row]), expected, atol=1e-5)


def test_a_stream_of_one_session_needs_no_reader_thread(client, lstm):
    session = client.start_session("lstm")
    x = sequences(8, count=1)[0]
    readers = []

    def steps():
        for t in range(5):
            yield session, x[t : t + 1]
            readers.append(
                sum(t.name == "stream-reader" for t in threading.enumerate())
            )

    streamed = np.concatenate(list(client.step_stream(steps())))

    assert readers == [0] * 5
    expected = small_models.offline_outputs(lstm, x[:5])
    np.testing.assert_allclose(streamed, expected, atol=1e-5)
