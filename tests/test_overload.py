"""More steps than the server can run: it sheds the excess at once and loses
nothing it admitted.

The server runs in a subprocess with a small --max-queued-steps and slow steps
(many timesteps, small batches). Streams keep up to STREAM_WINDOW steps in
flight each while unary callers step in a loop: together they offer far more
concurrent steps than the limit. Every step must be answered, OK or
RESOURCE_EXHAUSTED (never a deadline), admitted steps' latency stays bounded,
and each session's final state is Keras' over exactly its admitted steps.
The shed rate and latencies are printed; OVERLOAD_MAX_QUEUED_STEPS=0 runs the
same load without a limit, for comparison, and OVERLOAD_STREAM_WINDOW sets the
steps each stream keeps in flight.
"""

import dataclasses
import os
import threading
import time

import grpc
import numpy as np
import pytest
from grpc import StatusCode

from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.errors import ResourceExhausted, Unavailable
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from fake_model import FakeModel, chunk
from rpc_helpers import tensor
from small_models import frames, lstm_model, offline_state, save_models
from soak_server import server_process

LIMIT = int(os.environ.get("OVERLOAD_MAX_QUEUED_STEPS", "32"))
TIMESTEPS = 40  # per step: slow enough that the server falls behind
STREAMS, SESSIONS_PER_STREAM, STEPS_PER_STREAM = 4, 4, 300
STREAM_WINDOW = int(os.environ.get("OVERLOAD_STREAM_WINDOW", "16"))
UNARY_CALLERS, STEPS_PER_CALLER = 24, 40
BACKOFF_S = 0.02  # after a refusal
ADMITTED_P99_BOUND_S = 3.0
REFUSAL_P99_BOUND_S = 1.0  # generous: the test shares two cores with the server


def test_steps_past_the_limit_are_refused_before_they_are_queued():
    fake = FakeModel()
    core = SequenceCore({"fake": fake}, Config(port=0, max_queued_steps=2))
    try:
        a, b, c = (core.start_session("fake", name, None)[0].id for name in "abc")
        fake.hold()
        # The first step runs (in its caller's thread when the model is idle).
        running = threading.Thread(target=core.step, args=(a, chunk(1)))
        running.start()
        assert fake.entered.wait(5)
        _, queued = core.submit_step(b, chunk(2))
        with pytest.raises(ResourceExhausted):
            core.submit_step(c, chunk(3))
        with pytest.raises(ResourceExhausted):
            core.step_many([c], chunk(3)[None])
        assert core.admissions["fake"].refused == 2

        fake.release()
        running.join(5)
        queued.result(timeout=5)
        assert core.admissions["fake"].queued == 0
        _, values, timesteps, _ = core.read_state(c)
        assert timesteps == 0 and not values[0].any()  # the refusals changed nothing
        assert core.step(c, chunk(4))[1].timesteps == 1
    finally:
        fake.release()
        core.close()


def test_a_step_the_executor_refuses_gives_its_admission_back():
    core = SequenceCore({"fake": FakeModel()}, Config(port=0, max_queued_steps=1))
    try:
        session = core.start_session("fake", "a", None)[0].id

        def shutting_down(session, op):
            raise Unavailable("the server is shutting down")

        core._submit = shutting_down  # as an executor closing under the call
        for _ in range(2):  # the second would be RESOURCE_EXHAUSTED if one leaked
            with pytest.raises(Unavailable):
                core.submit_step(session, chunk(1))
        assert core.admissions["fake"].queued == 0
    finally:
        core.close()


@dataclasses.dataclass
class Sent:
    session: str
    inputs: np.ndarray
    sent_s: float
    via: str
    done_s: float = 0.0
    code: StatusCode | None = None


def stream_load(stub, sessions: list[str], seed: int, out: list) -> None:
    rng = np.random.default_rng(seed)
    plan = [
        (sessions[i % len(sessions)], frames(rng, TIMESTEPS))
        for i in range(STEPS_PER_STREAM)
    ]
    sent: list[Sent] = []
    window = threading.Semaphore(STREAM_WINDOW)

    def requests():
        for session, inputs in plan:
            window.acquire()
            sent.append(Sent(session, inputs, time.perf_counter(), "stream"))
            yield pb.StepRequest(session_id=session, inputs=tensor(inputs))

    for index, outcome in enumerate(stub.StepStream(requests(), timeout=120)):
        sent[index].done_s = time.perf_counter()
        sent[index].code = _code(outcome.error.code)
        if sent[index].code == StatusCode.OK:
            window.release()
        else:  # a well-behaved client backs off before sending again
            threading.Timer(BACKOFF_S, window.release).start()
    out.extend(sent)


def unary_load(stub, session: str, seed: int, out: list) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(STEPS_PER_CALLER):
        record = Sent(session, frames(rng, TIMESTEPS), time.perf_counter(), "unary")
        request = pb.StepRequest(session_id=session, inputs=tensor(record.inputs))
        try:
            stub.Step(request, timeout=60)
            record.code = StatusCode.OK
        except grpc.RpcError as error:
            record.code = error.code()
        record.done_s = time.perf_counter()
        out.append(record)
        if record.code != StatusCode.OK:
            time.sleep(BACKOFF_S)


def _code(value: int) -> StatusCode:
    return next(c for c in StatusCode if c.value[0] == value)


@pytest.fixture(scope="module")
def keras_model():
    return lstm_model()


@pytest.mark.slow
def test_overload_sheds_quickly_and_loses_nothing_admitted(
    tmp_path, keras_model, request
):
    save_models(tmp_path, {"lstm": keras_model})
    flags = ["--max-queued-steps", str(LIMIT), "--max-batch-size", "4"]
    with server_process(tmp_path, *flags) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SequenceServiceStub(channel)
            records, started_s = run_load(stub)
            elapsed_s = time.perf_counter() - started_s
            finals = {
                session: stub.GetState(pb.GetStateRequest(session_id=session))
                for session in {r.session for r in records}
            }
        assert server.alive()

    assert {r.code for r in records} <= {StatusCode.OK, StatusCode.RESOURCE_EXHAUSTED}
    admitted = [r for r in records if r.code == StatusCode.OK]
    refused = [r for r in records if r.code != StatusCode.OK]
    report(request, records, admitted, refused, elapsed_s)
    if LIMIT:
        assert refused, "the load did not overload the server; make steps slower"
        assert _p99(admitted) < ADMITTED_P99_BOUND_S
        unary_refused = [r for r in refused if r.via == "unary"]
        assert _p99(unary_refused) < REFUSAL_P99_BOUND_S
    assert len(admitted) > len(records) / 10  # still serving while overloaded
    assert_exact(keras_model, records, finals)


def run_load(stub):
    sessions = [
        stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        for _ in range(STREAMS * SESSIONS_PER_STREAM + UNARY_CALLERS)
    ]
    records: list[Sent] = []
    threads = [
        threading.Thread(
            target=stream_load,
            args=(stub, sessions[i::STREAMS][:SESSIONS_PER_STREAM], i, records),
        )
        for i in range(STREAMS)
    ]
    unary_sessions = sessions[STREAMS * SESSIONS_PER_STREAM :]
    threads += [
        threading.Thread(target=unary_load, args=(stub, s, 100 + i, records))
        for i, s in enumerate(unary_sessions)
    ]
    started_s = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not any(t.is_alive() for t in threads)
    return records, started_s


def assert_exact(keras_model, records: list[Sent], finals: dict) -> None:
    by_session: dict[str, list[np.ndarray]] = {}
    for record in records:  # each session's steps in the order it sent them
        if record.code == StatusCode.OK:
            by_session.setdefault(record.session, []).append(record.inputs)
    for session, final in finals.items():
        chunks = by_session.get(session, [])
        assert final.timesteps == TIMESTEPS * len(chunks)
        if not chunks:
            continue
        h, c = offline_state(keras_model, "lstm", np.concatenate(chunks))
        served = {
            p.part: np.frombuffer(p.value.data, np.float32) for p in final.state.parts
        }
        np.testing.assert_allclose(served["h"], h, atol=1e-4)
        np.testing.assert_allclose(served["c"], c, atol=1e-4)


def _latencies(records: list[Sent]) -> np.ndarray:
    return np.array([r.done_s - r.sent_s for r in records])


def _p99(records: list[Sent]) -> float:
    return float(np.percentile(_latencies(records), 99)) if records else 0.0


def report(request, records, admitted, refused, elapsed_s: float) -> None:
    def ms(rs, q):
        return f"{np.percentile(_latencies(rs), q) * 1e3:.0f}" if rs else "-"

    unary_refused = [r for r in refused if r.via == "unary"]
    line = (
        f"\noverload (--max-queued-steps {LIMIT}): {len(records)} steps in "
        f"{elapsed_s:.1f} s, {len(admitted) / elapsed_s:.0f} admitted/s, shed "
        f"{len(refused) / len(records):.1%}; admitted latency p50 "
        f"{ms(admitted, 50)} ms, p99 {ms(admitted, 99)} ms; unary refusals p50 "
        f"{ms(unary_refused, 50)} ms, p99 {ms(unary_refused, 99)} ms"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(line)
