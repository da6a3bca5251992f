"""Sessions survive a SIGTERM and a kill -9 of a real server process under load.

Each session steps numbered chunks of its own sequence from its own thread; the
client retries through the restart. After SIGTERM every session continues
where it was; after kill -9 a session the last snapshot left behind is
refused with the step number it expects, and its thread replays from there.
Either way every session ends equal to one offline Keras call.
"""

import threading
import time

import numpy as np
import pytest

from seqserve.client import Client, NotFoundError, RetryPolicy, StepOutOfOrderError

from server_process import ServerProcess, fast_reconnect_channel, free_port
from small_models import frames, lstm_model, offline_outputs, offline_state, save_models

SESSIONS = 16
CHUNKS = 160
PAUSE_S = 0.01
# Retries carry the sessions through the restart (a process start takes seconds).
THROUGH_RESTARTS = RetryPolicy(
    attempts=100_000, initial_backoff_s=0.05, max_backoff_s=0.5, deadline_s=240
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keras_lstm():
    return lstm_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, keras_lstm):
    return save_models(tmp_path_factory.mktemp("durable"), {"lstm": keras_lstm})


class Load:
    """SESSIONS sessions, each stepping CHUNKS chunks of random length."""

    def __init__(self, client: Client):
        rng = np.random.default_rng(11)
        self.sequences = [frames(rng, 2 * CHUNKS) for _ in range(SESSIONS)]
        self.chunks = [
            np.array_split(
                s, np.sort(rng.choice(np.arange(1, len(s)), CHUNKS - 1, False))
            )
            for s in self.sequences
        ]
        self.sessions = [client.start_session("lstm") for _ in range(SESSIONS)]
        self.outputs = [[None] * CHUNKS for _ in range(SESSIONS)]
        self.done = [0] * SESSIONS
        self.replayed = [0] * SESSIONS
        self.errors: list[BaseException] = []

    def run(self, index: int) -> None:
        try:
            self.drive(index)
        except BaseException as error:  # reported by the test
            self.errors.append(error)

    def drive(self, index: int) -> None:
        session, chunks = self.sessions[index], self.chunks[index]
        while session.step_number < CHUNKS:
            k = session.step_number
            try:
                self.outputs[index][k] = session.step(chunks[k])
            except StepOutOfOrderError as error:
                if not error.server_behind:
                    raise
                self.replayed[index] += k + 1 - error.expected_step_number
                session.resume_from(error.expected_step_number)
            self.done[index] = session.step_number
            time.sleep(PAUSE_S)

    def wait_until_each_did(self, steps: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while min(self.done) < steps:
            assert not self.errors, self.errors[0]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def finish(self, index: int) -> None:
        """A session whose thread ended before a crash may have been set back."""
        session = self.sessions[index]
        before = session.step_number
        session.sync()
        self.replayed[index] += before - session.step_number
        self.drive(index)

    def check(self, keras_model) -> None:
        assert not self.errors, self.errors[0]
        for index, session in enumerate(self.sessions):
            sequence = self.sequences[index]
            np.testing.assert_allclose(
                np.concatenate(self.outputs[index]),
                offline_outputs(keras_model, sequence),
                atol=1e-5,
            )
            state = session.get_state()["lstm"]
            h, c = offline_state(keras_model, "lstm", sequence)
            np.testing.assert_allclose(state["h"], h, atol=1e-5)
            np.testing.assert_allclose(state["c"], c, atol=1e-5)


def test_sessions_continue_through_sigterm_and_replay_through_kill(
    model_dir, tmp_path, keras_lstm
):
    """One load through three server processes: SIGTERM at a quarter of the
    steps, kill -9 at half of them (snapshots every 0.5 s)."""
    port = free_port()
    snapshot = tmp_path / "snap" / "lstm@1.snapshot"
    flags = ["--model-dir", str(model_dir), "--snapshot-dir", str(snapshot.parent)]
    flags += ["--snapshot-interval-s", "0.5"]
    # No drain: during one the load would go on at full speed to its end
    # (test_health.py covers the drain).
    flags += ["--drain-s", "0"]
    log = tmp_path / "server.log"
    server = ServerProcess(port, log, *flags)
    channel = fast_reconnect_channel(port)
    with Client("unused", channel=channel, retry=THROUGH_RESTARTS) as client:
        load = Load(client)
        threads = [
            threading.Thread(target=load.run, args=(i,)) for i in range(SESSIONS)
        ]
        for thread in threads:
            thread.start()
        try:
            load.wait_until_each_did(CHUNKS // 4)
            assert server.terminate() == 0
            server = ServerProcess(port, log, *flags)
            load.wait_until_each_did(CHUNKS // 2)
            assert sum(load.replayed) == 0, "SIGTERM lost steps"
            server.kill()
            assert sum(load.done) < SESSIONS * CHUNKS, "the load ended before the kill"
            server = ServerProcess(port, log, *flags)
            for thread in threads:
                thread.join(240)
            for index in range(SESSIONS):
                load.finish(index)
            load.check(keras_lstm)
        finally:
            server.kill()
    # Steps made after the last snapshot before the kill were lost and replayed.
    assert sum(load.replayed) > 0


def test_a_snapshot_cut_at_random_points_is_refused_and_the_server_starts(
    model_dir, tmp_path
):
    """A process writes a snapshot at SIGTERM; cut short at random points, each
    start refuses it with one log line, keeps it aside, and serves."""
    snapshot_dir = tmp_path / "snap"
    flags = ["--model-dir", str(model_dir), "--snapshot-dir", str(snapshot_dir)]
    flags += ["--drain-s", "0"]
    port = free_port()
    server = ServerProcess(port, tmp_path / "first.log", *flags)
    with Client(f"127.0.0.1:{port}") as client:
        ids = [client.start_session("lstm").id for _ in range(3)]
        for session_id in ids:
            client.attach(session_id, "lstm").step(np.ones((2, 3), np.float32))
    assert server.terminate() == 0
    snapshot = snapshot_dir / "lstm@1.snapshot"
    whole = snapshot.read_bytes()

    for attempt, cut in enumerate(np.random.default_rng(5).integers(1, len(whole), 3)):
        snapshot.write_bytes(whole[:cut])
        log = tmp_path / f"cut{attempt}.log"
        server = ServerProcess(port, log, *flags)  # returns once it serves
        try:
            with Client(f"127.0.0.1:{port}") as client:
                with pytest.raises(NotFoundError):
                    client.attach(ids[0], "lstm").get_state()
                fresh = client.start_session("lstm")
                assert fresh.step(np.ones((1, 3), np.float32)).shape == (1, 2)
        finally:
            server.kill()
        refusals = [line for line in log.read_text().splitlines() if "refused" in line]
        assert len(refusals) == 1 and "lstm@1.snapshot" in refusals[0], refusals
        assert not snapshot.exists()
        assert len(list(snapshot_dir.glob("lstm@1.snapshot.refused-*"))) == attempt + 1
