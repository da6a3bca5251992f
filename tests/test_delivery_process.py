"""Exactly-once steps and export/import against real server processes.

The same checks as test_step_numbers.py and test_snapshots.py make in process,
here over a real socket to `python -m seqserve.server`: lost replies retried
and applied once, a gap and an old number refused with the expected number,
and a session moved from one process to another. Two processes, started once.
"""

import grpc
import numpy as np
import pytest

from seqserve.client import Client, StepOutOfOrderError
from seqserve.server.errors import EXPECTED_STEP_KEY
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from lossy_channel import dropping_client
from rpc_helpers import refusal, tensor
from server_process import ServerProcess, free_port
from small_models import (
    assert_matches_offline,
    frames,
    lstm_model,
    save_models,
)

pytestmark = pytest.mark.slow

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def keras_lstm():
    return lstm_model()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, keras_lstm):
    """Two server processes on the same model."""
    directory = tmp_path_factory.mktemp("delivery")
    model_dir = save_models(directory, {"lstm": keras_lstm})
    started = []
    try:
        for name in ("first", "second"):
            log = directory / f"{name}.log"
            started.append(
                ServerProcess(free_port(), log, "--model-dir", str(model_dir))
            )
        yield started
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def first(servers):
    return servers[0]


def test_steps_whose_replies_are_lost_apply_once(first, keras_lstm):
    sequence = frames(np.random.default_rng(21), 24)
    client, dropper = dropping_client(first, every=3)
    with client, client.start_session("lstm") as session:
        streamed = [session.step(c) for c in np.split(sequence, 8)]
        state = session.get_state()

    assert dropper.dropped >= 2 and session.step_number == 8
    assert_matches_offline(keras_lstm, sequence, streamed, state)


def numbered(session_id: str, x, number: int) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, inputs=tensor(x), step_number=number)


def test_a_gap_and_an_old_number_are_refused_with_the_expected_number(first):
    x = frames(np.random.default_rng(22), 3)
    with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = pb_grpc.SequenceServiceStub(channel)
        sid = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        stub.Step(numbered(sid, x, 1), timeout=TIMEOUT_S)
        gap = refusal(stub.Step, numbered(sid, x, 3))
        stub.Step(numbered(sid, x, 2), timeout=TIMEOUT_S)
        old = refusal(stub.Step, numbered(sid, x, 1))
        read = stub.GetState(pb.GetStateRequest(session_id=sid), timeout=TIMEOUT_S)

    for error, expected in ((gap, "2"), (old, "3")):
        assert error.code() == grpc.StatusCode.ABORTED
        assert dict(error.trailing_metadata())[EXPECTED_STEP_KEY] == expected
    assert (read.step_number, read.timesteps) == (2, 6)


def test_the_client_reads_the_expected_number_of_a_gap(first):
    x = frames(np.random.default_rng(23), 2)
    with Client(f"127.0.0.1:{first.port}") as client:
        session = client.start_session("lstm")
        session.step(x)
        session.step_number = 4  # as if the server had lost steps 2 to 4
        with pytest.raises(StepOutOfOrderError) as behind:
            session.step(x)
        (on_stream,) = client.step_stream([(session, x)], numbered=True)

    assert behind.value.expected_step_number == 2 and behind.value.server_behind
    assert isinstance(on_stream, StepOutOfOrderError) and on_stream.server_behind
    assert on_stream.expected_step_number == 2


def test_a_session_exported_from_one_process_continues_in_another(servers, keras_lstm):
    sequence = frames(np.random.default_rng(24), 15)
    chunks = np.split(sequence, 5)
    one = Client(f"127.0.0.1:{servers[0].port}")
    two = Client(f"127.0.0.1:{servers[1].port}")
    with one, two:
        session = one.start_session("lstm")
        streamed = [session.step(c) for c in chunks[:3]]
        moved = two.import_session(one.export_session(session))
        streamed += [moved.step(c) for c in chunks[3:]]
        state = moved.get_state()
        left = session.get_state()

    assert (moved.id, moved.step_number, moved.timesteps) == (session.id, 5, 15)
    assert_matches_offline(keras_lstm, sequence, streamed, state)
    # The export left the first process's session where it was.
    assert_matches_offline(keras_lstm, sequence[:9], streamed[:3], left)
