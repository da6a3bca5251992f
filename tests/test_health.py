"""Health flips to SERVING only after warm-up and back during drain; reflection
lists the services, as grpcurl would see them."""

import queue
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from seqserve.server import healthcheck
from seqserve.server.app import App
from seqserve.server.config import Config
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from conftest import running_server
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
