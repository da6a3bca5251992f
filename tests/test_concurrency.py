"""Sessions stepped at once stay independent, and each one's steps apply in order.

Many concurrent streams are compared with offline Keras; the executor's
batching itself is unit-tested in test_executor.py.
"""

import threading

import numpy as np
import pytest

from seqserve.v1 import seqserve_pb2 as pb

from conftest import client_for, running_server
from rpc_helpers import outputs, stub_for, tensor
from small_models import (
    frames,
    gru_model,
    lstm_model,
    offline_outputs,
    offline_state,
    save_models,
)


@pytest.fixture(scope="module")
def keras_models():
    return {"lstm": lstm_model(), "gru": gru_model()}


@pytest.fixture(scope="module")
def app(tmp_path_factory, keras_models):
    directory = save_models(tmp_path_factory.mktemp("concurrency"), keras_models)
    with running_server(directory) as app:
        yield app


LAYERS = {"lstm": "lstm", "gru": "gru"}


def plan(index: int):
    """Session `index`: its model, whole sequence and random chunk lengths."""
    rng = np.random.default_rng(100 + index)
    model = "lstm" if index % 2 == 0 else "gru"
    sequence = frames(rng, int(rng.integers(10, 30)))
    cuts = np.cumsum(rng.integers(1, 7, size=len(sequence)))
    cuts = [int(c) for c in cuts if c < len(sequence)]
    return model, sequence, np.split(sequence, cuts)


def run_in_threads(count: int, target) -> None:
    """Runs `target(index, barrier)` in `count` threads; re-raises their errors."""
    barrier = threading.Barrier(count)
    errors = []

    def guarded(index):
        try:
            target(index, barrier)
        except BaseException as error:  # reported in the main thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


def test_many_sessions_from_many_threads_each_match_offline(app, keras_models):
    sessions_count, threads_count = 32, 16
    plans = [plan(i) for i in range(sessions_count)]
    streamed: dict[int, list[np.ndarray]] = {}
    finals = {}

    with client_for(app) as client:

        def stream(thread, barrier):
            mine = range(thread, sessions_count, threads_count)
            sessions = {i: client.start_session(plans[i][0]) for i in mine}
            pending = {i: list(plans[i][2]) for i in mine}
            barrier.wait()
            while any(pending.values()):  # alternate between this thread's sessions
                for i, chunks in pending.items():
                    if chunks:
                        streamed.setdefault(i, []).append(
                            sessions[i].step(chunks.pop(0))
                        )
            for i, session in sessions.items():
                finals[i] = session.get_state()
                session.close()

        run_in_threads(threads_count, stream)

    for i, (model, sequence, _) in enumerate(plans):
        offline = offline_outputs(keras_models[model], sequence)
        if model == "lstm":
            np.testing.assert_allclose(np.concatenate(streamed[i]), offline, atol=1e-5)
        else:
            np.testing.assert_allclose(streamed[i][-1], offline, atol=1e-5)
        expected = offline_state(keras_models[model], LAYERS[model], sequence)
        got = [finals[i][LAYERS[model]][part] for part in ("h", "c")[: len(expected)]]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_concurrent_steps_of_one_session_apply_one_after_another(app, keras_models):
    threads_count, steps_per_thread = 4, 12
    applied = []  # (timesteps after the step, inputs, outputs), in any order

    with stub_for(app) as stub:
        session_id = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id

        def hammer(thread, barrier):
            rng = np.random.default_rng(200 + thread)
            barrier.wait()
            for _ in range(steps_per_thread):
                x = frames(rng, int(rng.integers(1, 4)))
                reply = stub.Step(
                    pb.StepRequest(session_id=session_id, inputs=tensor(x))
                )
                applied.append((reply.timesteps, x, outputs(reply)))

        run_in_threads(threads_count, hammer)
        final = stub.GetState(pb.GetStateRequest(session_id=session_id))

    # The counter after each step tells the order the server applied them in;
    # serial application means the steps tile the sequence without overlap.
    applied.sort(key=lambda record: record[0])
    ends = [end for end, _, _ in applied]
    starts = [end - len(x) for end, x, _ in applied]
    assert starts == [0, *ends[:-1]]
    sequence = np.concatenate([x for _, x, _ in applied])
    offline = offline_outputs(keras_models["lstm"], sequence)
    for start_, (end, _, streamed) in zip(starts, applied):
        np.testing.assert_allclose(streamed, offline[start_:end], atol=1e-5)
    expected = offline_state(keras_models["lstm"], "lstm", sequence)
    for part, value in zip(final.state.parts, expected):
        np.testing.assert_allclose(
            np.frombuffer(part.value.data, "<f4"), value, atol=1e-5
        )
    assert final.timesteps == len(sequence)
