"""Health flips to SERVING only after warm-up and back during drain; reflection
lists the services, as grpcurl would see them."""

import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from seqserve.server import healthcheck
from seqserve.server.app import App
from seqserve.server.config import Config
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from conftest import REPO, running_server
from server_process import ServerProcess, free_port
from small_models import lstm_model, save_models

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "seqserve.v1.SequenceService", "seqserve.v1.AdminService")
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("health"), {"lstm": lstm_model()})


def statuses(port: int) -> list[int]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return [
            stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status
            for n in NAMES
        ]


def test_not_serving_while_models_load_then_serving(model_dir, monkeypatch):
    ports, release = queue.Queue(), threading.Event()
    load = App._load_models

    def held_load(app):
        ports.put(app.port)
        assert release.wait(TIMEOUT_S)
        return load(app)

    monkeypatch.setattr(App, "_load_models", held_load)
    started = []
    starting = threading.Thread(
        target=lambda: started.append(App(Config(model_dir=model_dir, port=0)))
    )
    starting.start()
    try:
        port = ports.get(timeout=TIMEOUT_S)
        assert statuses(port) == [NOT_SERVING] * 3
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.SequenceServiceStub(channel).ListModels(
                    pb.ListModelsRequest(), timeout=5
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        starting.join(TIMEOUT_S)
    app = started[0]
    try:
        assert statuses(app.port) == [SERVING] * 3
        assert healthcheck.main([f"--address=127.0.0.1:{app.port}"]) == 0
    finally:
        app.stop(grace_s=0)


def test_watchers_see_not_serving_as_soon_as_drain_starts(model_dir):
    app = App(Config(model_dir=model_dir, port=0))
    stopped = threading.Thread(target=app.stop, kwargs={"grace_s": 2})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
            assert next(watch).status == SERVING
            stopped.start()
            assert next(watch).status == NOT_SERVING
    finally:
        if stopped.ident is None:  # failed before the drain started
            app.stop(grace_s=0)
        stopped.join(TIMEOUT_S)
    assert healthcheck.main([f"--address=127.0.0.1:{app.port}"]) == 1


def test_during_the_drain_new_checks_see_not_serving_and_calls_are_served(model_dir):
    app = App(Config(model_dir=model_dir, port=0))
    stopped = threading.Thread(target=app.stop, kwargs={"grace_s": 0, "drain_s": 6})
    try:
        assert statuses(app.port) == [SERVING] * 3
        stopped.start()
        # A probe opens a new connection and makes a new call each time.
        deadline = time.monotonic() + TIMEOUT_S
        while statuses(app.port) != [NOT_SERVING] * 3:
            assert time.monotonic() < deadline, "health never reported the drain"
            time.sleep(0.05)
        assert healthcheck.main([f"--address=127.0.0.1:{app.port}"]) == 1
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.SequenceServiceStub(channel)
            reply = stub.ListModels(pb.ListModelsRequest(), timeout=5)
        # Served after health said NOT_SERVING: without a drain, refused.
        assert [m.name for m in reply.models] == ["lstm"]
    finally:
        if stopped.ident is None:
            app.stop(grace_s=0)
        stopped.join(2 * TIMEOUT_S)


def test_sigterm_drains_for_drain_s_then_exits_0(model_dir, tmp_path):
    # The command line's own path: a server process, its flags, its signal.
    port = free_port()
    flags = [f"--model-dir={model_dir}", "--drain-s=3", "--shutdown-grace-s=1"]
    server = ServerProcess(port, tmp_path / "server.log", *flags)
    try:
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = began + TIMEOUT_S
        while statuses(port) != [NOT_SERVING] * 3:
            assert time.monotonic() < deadline, "health never reported the drain"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SequenceServiceStub(channel)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert server.process.wait(timeout=60) == 0
    finally:
        if server.process.poll() is None:
            server.kill()
    assert time.monotonic() - began >= 3


def test_the_pod_waits_for_the_drain_and_the_grace_period():
    deployment = yaml.safe_load((REPO / "deploy" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    config = Config.from_args([], environ=env)
    # Room beyond both for the snapshot and the executors to close.
    needed_s = config.drain_s + config.shutdown_grace_s + 10
    assert pod["terminationGracePeriodSeconds"] >= needed_s
    readiness = pod["containers"][0]["readinessProbe"]
    # The drain outlasts the probes that take the pod out of rotation.
    assert config.drain_s >= readiness["periodSeconds"] * readiness["failureThreshold"]


def test_the_health_check_command_imports_no_tensorflow():
    code = (
        "import sys, seqserve.server.healthcheck; "
        "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_reflection_lists_every_service_and_describes_them(model_dir):
    with running_server(model_dir) as app:
        assert app.metrics_port is None  # off unless asked for
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert sorted(database.get_services()) == [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "seqserve.v1.AdminService",
                "seqserve.v1.SequenceService",
            ]
            found = database.FindFileContainingSymbol("seqserve.v1.AdminService")
            assert found.name == "seqserve/v1/admin.proto"
            assert [m.name for m in found.service[0].method] == [
                "ListSessions",
                "DescribeSession",
                "EvictSession",
                "EvictSessions",
            ]
