"""The metrics endpoint, fetched over HTTP, reports exactly what a scripted run did."""

import time

import grpc
import numpy as np
import pytest

from seqserve.client import InvalidArgumentError
from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.metrics import BulkHistogram
from seqserve.server.models import StatePartSpec
from seqserve.v1 import admin_pb2, admin_pb2_grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from admin_helpers import admin_for, scrape
from conftest import client_for, running_server
from fake_model import UNITS, FakeModel
from rpc_helpers import tensor
from small_models import LSTM_UNITS, frames, lstm_model, save_models

LSTM = (("model", "lstm"),)
STATE_BYTES = 2 * LSTM_UNITS * 4  # h and c, float32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("metrics"), {"lstm": lstm_model()})


def run_script(app, rng) -> None:
    """3 sessions, 7 steps of 15 timesteps in 6 executions, 1 refused, 1 ended,
    1 evicted."""
    with client_for(app) as client, admin_for(app) as admin:
        first, second, third = (client.start_session("lstm") for _ in range(3))
        for session, timesteps in ((first, 2), (first, 3), (second, 1), (second, 4)):
            session.step(frames(rng, timesteps))
        third.step(frames(rng, 1))
        client.step_many([first, second], np.stack([frames(rng, 2)] * 2))
        with pytest.raises(InvalidArgumentError):
            first.step(np.zeros((1, 7), np.float32))  # 7 features, not 3
        third.close()
        admin.EvictSession(admin_pb2.EvictSessionRequest(session_id=second.id))


def test_scripted_run_gives_exact_counts(model_dir):
    with running_server(model_dir, metrics_port=0) as app:
        run_script(app, np.random.default_rng(0))
        samples = scrape(app)
    expected = {
        ("seqserve_sessions_live", LSTM): 1,
        ("seqserve_session_state_bytes", LSTM): STATE_BYTES,
        ("seqserve_queue_depth", LSTM): 0,
        ("seqserve_steps_total", LSTM): 7,
        ("seqserve_timesteps_total", LSTM): 2 + 3 + 1 + 4 + 1 + 2 * 2,
        ("seqserve_step_latency_seconds_count", LSTM): 7,
        ("seqserve_batch_size_count", LSTM): 6,
        ("seqserve_batch_size_sum", LSTM): 7,
        ("seqserve_batch_size_bucket", (("le", "1.0"), *LSTM)): 5,
        ("seqserve_batch_size_bucket", (("le", "2.0"), *LSTM)): 6,
        ("seqserve_sessions_started_total", (*LSTM, ("reason", "new"))): 3,
        ("seqserve_sessions_started_total", (*LSTM, ("reason", "restored"))): 0,
        ("seqserve_sessions_ended_total", (*LSTM, ("reason", "closed"))): 1,
        ("seqserve_sessions_ended_total", (*LSTM, ("reason", "idle_timeout"))): 0,
        ("seqserve_sessions_ended_total", (*LSTM, ("reason", "evicted"))): 1,
        ("seqserve_requests_rejected_total", (("code", "INVALID_ARGUMENT"),)): 1,
    }
    assert {key: samples.get(key) for key in expected} == expected
    rejected = [k for k in samples if k[0] == "seqserve_requests_rejected_total"]
    assert len(rejected) == 1
    latency_sum = samples[("seqserve_step_latency_seconds_sum", LSTM)]
    assert 0 < latency_sum < 30


def test_expiry_and_stream_refusals_are_counted(model_dir):
    with running_server(model_dir, metrics_port=0, idle_timeout_s=0.2) as app:
        with client_for(app) as client:
            session = client.start_session("lstm")
            replies = list(
                client.step_stream([(session, frames(np.random.default_rng(1), 1))])
            )
            assert isinstance(replies[0], np.ndarray)
            deadline = time.monotonic() + 10
            key = ("seqserve_sessions_ended_total", (*LSTM, ("reason", "idle_timeout")))
            while scrape(app)[key] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            replies = list(
                client.step_stream([(session, frames(np.random.default_rng(1), 1))])
            )
            assert replies[0].code == grpc.StatusCode.NOT_FOUND
        samples = scrape(app)
    assert samples[key] == 1
    assert samples[("seqserve_sessions_live", LSTM)] == 0
    assert samples[("seqserve_requests_rejected_total", (("code", "NOT_FOUND"),))] == 1


def test_token_order_and_size_refusals_are_counted(model_dir, tmp_path):
    # Raw calls: the client would retry RESOURCE_EXHAUSTED, and count twice.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\n")
    limit = 8 * 1024
    settings = {"metrics_port": 0, "token_file": tokens, "max_message_bytes": limit}
    with running_server(model_dir, **settings) as app:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.SequenceServiceStub(channel)
            session_id = stub.StartSession(
                pb.StartSessionRequest(model="lstm"), metadata=BEARER, timeout=30
            ).session_id
            big, small = (
                pb.StepRequest(
                    session_id=session_id, inputs=tensor(np.zeros(shape, np.float32))
                )
                for shape in ((limit // 12 + 10, 3), (1, 3))
            )
            refusals = [
                (stub.ListModels, pb.ListModelsRequest(), None),  # UNAUTHENTICATED
                (stub.ListModels, pb.ListModelsRequest(), "guess"),  # UNAUTHENTICATED
                (stub.Step, big, ALICE),  # RESOURCE_EXHAUSTED: over the limit
                (
                    admin_pb2_grpc.AdminServiceStub(channel).ListSessions,
                    admin_pb2.ListSessionsRequest(),
                    ALICE,
                ),  # PERMISSION_DENIED: no admin tokens
            ]
            for method, request, token in refusals:
                with pytest.raises(grpc.RpcError):
                    method(request, metadata=_bearer(token), timeout=30)
            with pytest.raises(grpc.RpcError):  # UNAUTHENTICATED, on a stream
                list(stub.StepStream(iter([small]), timeout=30))

            numbered = [pb.StepRequest(), pb.StepRequest()]
            for request, step_number in zip(numbered, (2, 5)):
                request.CopyFrom(small)
                request.step_number = step_number
            outcomes = list(
                stub.StepStream(
                    iter([big, small, *numbered]), metadata=BEARER, timeout=30
                )
            )
        samples = scrape(app)
    assert [o.WhichOneof("result") for o in outcomes] == [
        "error",  # RESOURCE_EXHAUSTED: over the limit
        "response",  # step 1
        "response",  # step 2, the next one
        "error",  # ABORTED: a gap (5 after 2)
    ]
    assert outcomes[3].error.expected_step_number == 3
    rejected = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "seqserve_requests_rejected_total"
    }
    assert rejected == {
        "UNAUTHENTICATED": 3,
        "PERMISSION_DENIED": 1,
        "RESOURCE_EXHAUSTED": 2,
        "ABORTED": 1,
    }


ALICE = "alice-5d1f93c0a7e2"
BEARER = [("authorization", f"Bearer {ALICE}")]


def _bearer(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else None


def test_state_bytes_follow_each_session_s_own_version():
    # Version 2 of the model holds more state per session than version 1:
    # sessions still on version 1 count by its layout.
    old, new = FakeModel(), FakeModel()
    new.version = 2
    new.state_parts = (StatePartSpec("rnn", "FakeRNN", "h", 7),)
    core = SequenceCore([old], Config(port=0))
    try:
        for session_id in ("a", "b"):
            core.start_session("fake", session_id, None)
        core.versions.add(new)
        core.start_session("fake", "c", None)
        value = core.metrics.registry.get_sample_value
        held = value("seqserve_session_state_bytes", {"model": "fake"})
        live = value("seqserve_sessions_live", {"model": "fake"})
    finally:
        core.close()
    assert (live, held) == (3, 2 * 4 * UNITS + 1 * 4 * 7)


def test_bulk_histogram_counts_as_prometheus_does():
    histogram = BulkHistogram((1.0, 2.0, 5.0))
    histogram.observe([0.5, 1.0, 1.5])  # the Python path
    histogram.observe([2.0] * 10 + [5.5] * 10)  # the NumPy path
    assert histogram.buckets() == [("1.0", 2), ("2.0", 13), ("5.0", 13), ("+Inf", 23)]
    assert histogram.sum == pytest.approx(0.5 + 1.0 + 1.5 + 20 + 55)
