"""Builds and runs the gRPC server around a core."""

import concurrent.futures
import logging
import os
import sys
import time
from pathlib import Path

import grpc
import threadpoolctl

from seqserve.v1 import admin_pb2, seqserve_pb2

from .admin_servicer import AdminServicer
from .config import Config, SettingError
from .core import SequenceCore
from .discovery import Health, enable_reflection
from .errors import Unavailable
from .metrics import Metrics
from .model_versions import VersionWatcher, loader
from .models import ServedModel
from .parsing import add_to_server
from .security import interceptors, listen, server_credentials, server_options
from .servicer import SequenceServicer
from .session_admin import SessionAdmin
from .snapshots import Snapshotter, restore_all

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 50e-6
# Without this, gRPC lets a second server bind a port in use, and clients are
# split between the two.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


class App:
    """A started server; `port` is the bound port (useful with port 0), and
    `metrics_port` the bound metrics port (None when metrics are off).

    It listens before the models load, with the health service NOT_SERVING and
    every other call UNAVAILABLE, and reports SERVING once all are warmed up.
    """

    def __init__(self, config: Config):
        self.config = config
        self.started_s = time.monotonic()
        # Steps are small matrix products; a second BLAS thread fighting the
        # gRPC threads for two cores made them erratic, 10 to 100 times slower.
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")
        # A step hands off between a gRPC thread and the model's executor thread
        # twice; at Python's default 5 ms switch interval a handoff could wait
        # for the GIL that long (measured on one session: p50 1.6 ms, p99 7.3 ms
        # per Step; at 50 us: 1.1 ms and 1.8 ms).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Files named by settings are read first: a typo there should not wait
        # for every model to load.
        _check_model_dir(config)
        _check_snapshot_dir(config)
        self.metrics = Metrics()
        self._auth = interceptors(config, self.metrics.rejected)
        self._credentials = server_credentials(config)
        self.watcher = VersionWatcher(
            config.model_dir,
            config.model_poll_interval_s,
            loader(
                config.allow_unsafe_deserialization,
                config.execution,
                config.max_batch_size,
            ),
        )
        self.core = None
        self.snapshotter: Snapshotter | None = None
        self._listen()
        try:
            self.metrics_port = self._serve_metrics()
            self._start_core()
        except BaseException:
            self.server.stop(0).wait()
            self.metrics.stop()
            raise
        if config.model_poll_interval_s > 0:
            self.watcher.start(
                self.core.versions.newest_version, self.core.versions.add
            )
        self.health.serving()
        if self.snapshotter is not None:
            self.snapshotter.start()
        log.info(
            "serving models %s: all loaded and warmed up",
            [f"{m.name} v{m.version}" for m in self.core.versions.all()],
        )

    def _listen(self) -> None:
        config, loading = self.config, _Loading()
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=config.worker_threads, thread_name_prefix="grpc"
            ),
            maximum_concurrent_rpcs=None,
            options=SERVER_OPTIONS + server_options(config),
            interceptors=self._auth,
        )
        self._sequence = SequenceServicer(loading, self.metrics)
        self._admin = AdminServicer(loading, self.metrics)
        for servicer, module, name in (
            (self._sequence, seqserve_pb2, "SequenceService"),
            (self._admin, admin_pb2, "AdminService"),
        ):
            service = module.DESCRIPTOR.services_by_name[name]
            add_to_server(servicer, service, self.server, config.max_message_bytes)
        self.health = Health(self.server)
        enable_reflection(self.server)
        address = f"{config.host}:{config.port}"
        self.port = listen(self.server, address, self._credentials)
        self.server.start()
        log.info("listening on %s:%d; loading models", config.host, self.port)

    def _serve_metrics(self) -> int | None:
        if self.config.metrics_port is None:
            return None
        try:
            port = self.metrics.serve(self.config.host, self.config.metrics_port)
        except OSError as error:
            raise RuntimeError(
                f"could not serve metrics on {self.config.host}:"
                f"{self.config.metrics_port}: {error}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        return port

    def _start_core(self) -> None:
        models = self._load_models()
        if not models:
            raise RuntimeError(f"no model could be loaded from {self.config.model_dir}")
        self.core = SequenceCore(models, self.config, self.metrics)
        # Before any call reaches the core: clients see every restored session.
        self.snapshotter = self._restore_sessions()
        self._sequence.core = self.core
        self._admin.admin = SessionAdmin(self.core)

    def _load_models(self) -> list[ServedModel]:
        return self.watcher.load_newest()

    def _restore_sessions(self) -> Snapshotter | None:
        if not self.config.snapshot_dir:
            if self.config.snapshot_interval_s:
                log.warning(
                    "snapshot_interval_s is %g but snapshot_dir is not set: no "
                    "snapshots are written",
                    self.config.snapshot_interval_s,
                )
            return None
        directory = Path(self.config.snapshot_dir)
        snapshotter = Snapshotter(self.core, directory, self.config.snapshot_interval_s)
        restore_all(self.core, directory)
        return snapshotter

    def stop(self, grace_s: float | None = None, drain_s: float = 0.0) -> bool:
        """Reports NOT_SERVING, and for `drain_s` seconds goes on serving every
        call (health checks then answer NOT_SERVING, so that probes and load
        balancers stop sending new calls); then refuses new calls, gives those
        in flight `grace_s` seconds (None: --shutdown-grace-s) to finish,
        writes the snapshot (with a snapshot directory), and stops the
        executors. The command line drains for --drain-s; in-process users
        have no load balancer to wait for. Returns False when the snapshot
        failed to write some sessions (the command line then exits 1)."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.watcher.stop()
        self.health.draining()
        if drain_s > 0:
            log.info("draining: NOT_SERVING for %g s, still serving calls", drain_s)
            time.sleep(drain_s)
        self.server.stop(grace_s).wait()
        self.metrics.stop()
        if self.core is None:
            return True
        unwritten = 0
        if self.snapshotter is not None:
            self.snapshotter.close()
            written, unwritten = self.snapshotter.write_all()
            log.info("wrote %d sessions to %s", written, self.snapshotter.directory)
            if unwritten:
                log.error(
                    "%d sessions were not written to %s and are lost (see above); "
                    "a snapshot from before may still hold them",
                    unwritten,
                    self.snapshotter.directory,
                )
        self.core.close()
        log.info(
            "stopped after %.0f s; %d sessions were live; %s",
            time.monotonic() - self.started_s,
            len(self.core.sessions),
            self.metrics.summary(),
        )
        return not unwritten


def _check_model_dir(config: Config) -> None:
    if not config.model_dir.is_dir():
        raise SettingError(
            f"model_dir: expected a directory of .keras or .h5 files, received "
            f"{str(config.model_dir)!r}, which is not a directory"
        )


def _check_snapshot_dir(config: Config) -> None:
    """Creates the snapshot directory, so that one that cannot be written
    stops the start instead of losing the sessions at shutdown."""
    if not config.snapshot_dir:
        return
    directory = Path(config.snapshot_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as error:
        reason = error.strerror or str(error)
        raise SettingError(
            f"snapshot_dir: expected a directory that this user can write, or "
            f"where one can be made, received {config.snapshot_dir!r} ({reason})"
        ) from None


class _Loading:
    """Stands in for the core and the session admin while the models load."""

    def __getattr__(self, name: str):
        raise Unavailable(
            "the server is still loading its models; retry once its health "
            "service reports SERVING"
        )
