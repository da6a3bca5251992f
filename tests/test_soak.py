"""A bounded soak of a server subprocess, and 100,000 start/end cycles.

Client threads mix sessions that start, step (Step, StepMany, StepStream),
reset, end and idle out (--idle-timeout-s is short), with malformed requests.
Each thread knows every step its sessions took, so at the end each surviving
session must equal Keras over its sequence since its last reset; the sessions
left idle must have expired. Resident memory and open descriptors at the end
must be within 10 % of their level after a warm-up of the same mix.

CI runs a short soak; SOAK_S=3600 soaks for an hour, SOAK_CYCLES sets the
number of start/end cycles. The figures are printed.
"""

import collections
import os
import threading
import time

import grpc
import pytest
from grpc import StatusCode

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from small_models import gru_model, lstm_model, save_models
from soak_mix import IDLE_TIMEOUT_S, SoakWorker
from soak_server import server_process

pytestmark = pytest.mark.slow

SOAK_S = float(os.environ.get("SOAK_S", "75"))
WARMUP_S = 20.0
WORKERS = 4
CYCLES = int(os.environ.get("SOAK_CYCLES", "100000"))
CYCLE_WARMUP = 5_000
CYCLE_THREADS = 8
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def keras_models():
    return {"lstm": lstm_model(), "gru": gru_model()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, keras_models):
    directory = save_models(tmp_path_factory.mktemp("soak"), keras_models)
    flags = ["--idle-timeout-s", str(IDLE_TIMEOUT_S)]
    with server_process(directory, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.SequenceServiceStub(channel)


def say(request, line: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(line)


def run_workers(workers: list[SoakWorker], seconds: float) -> None:
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=w.run, args=(until,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    assert not any(t.is_alive() for t in threads)
    for worker in workers:
        if worker.error is not None:
            raise worker.error


def test_soak_keeps_every_session_exact_and_leaks_nothing(
    server, stub, keras_models, request
):
    workers = [SoakWorker(stub, seed=i) for i in range(WORKERS)]
    run_workers(workers, WARMUP_S)
    warm_rss, warm_fds = server.rss_bytes(), server.open_fds()

    run_workers(workers, SOAK_S)
    for worker in workers:
        worker.snapshot_survivors()
    time.sleep(IDLE_TIMEOUT_S * 1.25 + 0.5)  # then every session has expired
    end_rss, end_fds = server.rss_bytes(), server.open_fds()

    for worker in workers:
        worker.check_survivors(keras_models)
        worker.check_everything_expired()
    counts = sum((w.counts for w in workers), start=collections.Counter())
    say(
        request,
        f"\nsoak {WARMUP_S:.0f} s warm-up + {SOAK_S:.0f} s: {sum(counts.values())} "
        f"actions ({dict(sorted(counts.items()))}); RSS {warm_rss / 2**20:.1f} -> "
        f"{end_rss / 2**20:.1f} MiB, fds {warm_fds} -> {end_fds}",
    )
    assert server.alive()
    assert abs(end_rss - warm_rss) <= TOLERANCE * warm_rss
    assert abs(end_fds - warm_fds) <= TOLERANCE * warm_fds


def cycles(stub, count: int, threads: int = CYCLE_THREADS) -> None:
    """`count` sessions started and ended, from `threads` threads."""
    errors = []

    def run(share: int):
        try:
            for _ in range(share):
                reply = stub.StartSession(pb.StartSessionRequest(model="gru"))
                stub.EndSession(pb.EndSessionRequest(session_id=reply.session_id))
        except grpc.RpcError as error:
            errors.append(error)

    shares = [count // threads + (i < count % threads) for i in range(threads)]
    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors[0]


def test_start_end_cycles_leave_no_growth(server, stub, request):
    """Within 10 %, which covers the one thing that does grow by design: the
    registry remembers the last 100,000 ended ids (about 16 MiB) so that a late
    call learns its session ended rather than never existed."""
    cycles(stub, CYCLE_WARMUP)
    before_rss, before_fds = server.rss_bytes(), server.open_fds()
    started = time.monotonic()
    cycles(stub, CYCLES)
    elapsed = time.monotonic() - started
    after_rss, after_fds = server.rss_bytes(), server.open_fds()

    say(
        request,
        f"\n{CYCLES} start/end cycles in {elapsed:.0f} s: RSS "
        f"{before_rss / 2**20:.1f} -> {after_rss / 2**20:.1f} MiB, fds "
        f"{before_fds} -> {after_fds}",
    )
    probe = pb.GetStateRequest(session_id="never-started")
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetState(probe)
    assert refused.value.code() == StatusCode.NOT_FOUND
    assert after_rss - before_rss <= TOLERANCE * before_rss
    assert after_fds - before_fds <= max(2, TOLERANCE * before_fds)
