"""Builds and runs the gRPC server around a core."""

import concurrent.futures
import logging
import sys
from pathlib import Path

import grpc
import threadpoolctl

from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .config import Config
from .core import SequenceCore
from .models import load_model_dir
from .servicer import SequenceServicer
from .snapshots import Snapshotter, restore_all

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 50e-6
# Without this, gRPC lets a second server bind a port in use, and clients are
# split between the two.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


class App:
    """A started server; `port` is the bound port (useful with port 0)."""

    def __init__(self, config: Config):
        self.config = config
        # Steps are small matrix products; a second BLAS thread fighting the
        # gRPC threads for two cores made them erratic, 10 to 100 times slower.
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")
        # A step hands off between a gRPC thread and the model's executor thread
        # twice; at Python's default 5 ms switch interval a handoff could wait
        # for the GIL that long (measured on one session: p50 1.6 ms, p99 7.3 ms
        # per Step; at 50 us: 1.1 ms and 1.8 ms).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        models = load_model_dir(
            config.model_dir,
            config.allow_unsafe_deserialization,
            config.execution,
            config.max_batch_size,
        )
        if not models:
            raise RuntimeError(f"no model could be loaded from {config.model_dir}")
        self.core = SequenceCore(models, config)
        self.snapshotter = self._restore_sessions()
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=config.worker_threads, thread_name_prefix="grpc"
            ),
            maximum_concurrent_rpcs=None,
            options=SERVER_OPTIONS,
        )
        pb_grpc.add_SequenceServiceServicer_to_server(
            SequenceServicer(self.core), self.server
        )
        address = f"{config.host}:{config.port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            self.core.close()
            raise RuntimeError(f"could not listen on {address}: is it in use?")
        self.server.start()
        if self.snapshotter is not None:
            self.snapshotter.start()
        log.info(
            "listening on %s:%d with models %s", config.host, self.port, sorted(models)
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuses new calls, lets calls in flight finish, writes the snapshot (with
        a snapshot directory), then stops the executors."""
        self.server.stop(grace_s).wait()
        if self.snapshotter is not None:
            self.snapshotter.close()
            written = self.snapshotter.write_all()
            log.info("wrote %d sessions to %s", written, self.snapshotter.directory)
        self.core.close()
        log.info("stopped; %d sessions were live", len(self.core.sessions))

    def _restore_sessions(self) -> Snapshotter | None:
        """Before the server listens: clients see every restored session or none."""
        if not self.config.snapshot_dir:
            return None
        directory = Path(self.config.snapshot_dir)
        snapshotter = Snapshotter(self.core, directory, self.config.snapshot_interval_s)
        restore_all(self.core, directory)
        return snapshotter
