"""A seqserve server in its own process, for tests that stop it the hard way."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

START_TIMEOUT_S = 180


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fast_reconnect_channel(port: int) -> grpc.Channel:
    """A channel that finds a restarted server within a fraction of a second
    (gRPC's default reconnect backoff grows to two minutes)."""
    options = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


class ServerProcess:
    """`python -m seqserve.server` on `port`; its output goes to `log_path`."""

    def __init__(self, port: int, log_path: Path, *flags: str):
        self.port = port
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        command = [sys.executable, "-m", "seqserve.server", "--port", str(port)]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, *flags], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.log_path = log_path
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with fast_reconnect_channel(self.port) as channel:
            stub = pb_grpc.SequenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited; see {self.log_path}")
                try:
                    stub.ListModels(pb.ListModelsRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not start; see {self.log_path}")

    def terminate(self) -> int:
        """SIGTERM, then waits for the exit; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)
