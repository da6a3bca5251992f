"""64 sessions at once over unary calls and streams, with retries injected,
against a server process.

Half the sessions step over unary calls through a channel that loses every
fifth reply after the server applied the step (the client retries it); the
other half step on four numbered streams that send some steps twice. Every
session must end equal to one offline Keras call on its whole sequence.
"""

import threading

import numpy as np
import pytest

from seqserve.v1 import seqserve_pb2 as pb

from lossy_channel import dropping_client
from rpc_helpers import stub_for, tensor
from server_process import ServerProcess, free_port
from small_models import frames, lstm_model, offline_outputs, offline_state, save_models

SESSIONS = 64
STREAMS = 4
UNARY_THREADS = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keras_lstm():
    return lstm_model()


def plan(index: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(500 + index)
    sequence = frames(rng, int(rng.integers(20, 40)))
    cuts = np.cumsum(rng.integers(1, 6, size=len(sequence)))
    return sequence, np.split(sequence, [c for c in cuts if c < len(sequence)])


def drive_unary(client, indices, chunks, ids, streamed) -> None:
    sessions = {i: client.attach(ids[i], "lstm") for i in indices}
    for k in range(max(len(chunks[i]) for i in indices)):
        for i in indices:  # interleaved, so sessions batch together
            if k < len(chunks[i]):
                streamed[i].append(sessions[i].step(chunks[i][k]))


def drive_stream(stub, indices, chunks, ids, streamed, rng) -> None:
    sent = []
    for k in range(max(len(chunks[i]) for i in indices)):
        for i in indices:
            if k < len(chunks[i]):
                repeats = 2 if rng.random() < 0.2 else 1  # a resend of the same step
                sent += [(i, k)] * repeats
    requests = (
        pb.StepRequest(
            session_id=ids[i], inputs=tensor(chunks[i][k]), step_number=k + 1
        )
        for i, k in sent
    )
    replies = {}
    for (i, k), outcome in zip(sent, stub.StepStream(requests, timeout=120)):
        assert outcome.HasField("response"), outcome.error.message
        if (i, k) in replies:  # the resend got the first reply, unchanged
            assert outcome.response == replies[i, k]
        replies[i, k] = outcome.response
    for i in indices:
        streamed[i] = [
            np.frombuffer(replies[i, k].outputs[0].data, np.float32).reshape(-1, 2)
            for k in range(len(chunks[i]))
        ]


def test_sixty_four_sessions_with_retries_each_match_offline(tmp_path, keras_lstm):
    plans = [plan(i) for i in range(SESSIONS)]
    chunks = [c for _, c in plans]
    streamed: dict[int, list] = {i: [] for i in range(SESSIONS)}
    directory = save_models(tmp_path, {"lstm": keras_lstm})
    log = tmp_path / "server.log"
    server = ServerProcess(free_port(), log, "--model-dir", str(directory))
    try:
        dropped, states = drive_all(server, chunks, streamed)
    finally:
        server.kill()

    assert dropped > 10
    for index, (sequence, _) in enumerate(plans):
        assert len(streamed[index]) == len(chunks[index]), f"session {index}"
        np.testing.assert_allclose(
            np.concatenate(streamed[index]),
            offline_outputs(keras_lstm, sequence),
            atol=1e-5,
        )
        h, c = offline_state(keras_lstm, "lstm", sequence)
        parts = {
            p.part: np.frombuffer(p.value.data, np.float32)
            for p in states[index].state.parts
        }
        np.testing.assert_allclose(parts["h"], h, atol=1e-5)
        np.testing.assert_allclose(parts["c"], c, atol=1e-5)
        assert states[index].step_number == len(chunks[index])


def drive_all(server, chunks, streamed) -> tuple[int, list[pb.GetStateResponse]]:
    """Starts the sessions and drives each through its chunks, half on unary
    calls that lose replies, half on streams; returns the number of replies
    lost and each session's final GetState reply."""
    with stub_for(server) as stub:
        client, dropper = dropping_client(server, every=5)
        ids = [
            stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
            for _ in range(SESSIONS)
        ]
        unary = list(range(0, SESSIONS, 2))
        on_streams = list(range(1, SESSIONS, 2))
        rng = np.random.default_rng(7)
        threads = [
            threading.Thread(
                target=drive_unary,
                args=(client, unary[t::UNARY_THREADS], chunks, ids, streamed),
            )
            for t in range(UNARY_THREADS)
        ] + [
            threading.Thread(
                target=drive_stream,
                args=(stub, on_streams[t::STREAMS], chunks, ids, streamed, rng),
            )
            for t in range(STREAMS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        states = [
            stub.GetState(pb.GetStateRequest(session_id=sid), timeout=10) for sid in ids
        ]
        client.close()
    return dropper.dropped, states
