"""Server configuration: one frozen object, filled from flags and environment."""

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV_PREFIX = "SEQSERVE_"


class SettingError(ValueError):
    """A setting whose value only the start can find wrong: a file or directory
    that is missing, unreadable or malformed. The message names the setting;
    the command line exits 2, as for any bad value."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Every server setting, validated at construction."""

    model_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 50051
    max_sessions: int = 100_000
    idle_timeout_s: float = 0.0
    max_batch_size: int = 256
    max_batch_wait_ms: float = 0.0
    # Timesteps in one Step (per session in StepMany): a long step holds up
    # every other session of its model while it runs.
    max_timesteps: int = 10_000
    # Session-steps queued or running per model before new steps are refused
    # with RESOURCE_EXHAUSTED (a StepMany counts one per session); 0 is no limit.
    max_queued_steps: int = 10_000
    worker_threads: int = 32
    allow_unsafe_deserialization: bool = False
    # "auto": NumPy for plain layer stacks where timing shows it is faster;
    # "tensorflow": always the traced TensorFlow function.
    execution: str = "auto"
    # Where session states live. "auto": in TensorFlow variables (on the GPU)
    # when TensorFlow sees a GPU, else in host arrays; "host"; "tensorflow".
    state_storage: str = "auto"
    # Where sessions are written at shutdown (and every snapshot_interval_s)
    # and restored from at start; empty: sessions live in memory only.
    snapshot_dir: str = ""
    # Seconds between periodic snapshots; 0: only at shutdown.
    snapshot_interval_s: float = 0.0
    log_level: str = "INFO"
    # Seconds between looks for new model versions in model_dir; 0 is off.
    model_poll_interval_s: float = 5.0
    # TLS: a PEM certificate chain and its key; with a client CA, every client
    # must present a certificate signed by it (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Bearer tokens, one `name token` per line; the file keeps them out of `ps`.
    token_file: Path | None = None
    # Tokens for seqserve.v1.AdminService. With auth on (a token file or a client
    # CA) and none given, admin calls are refused; with no auth, they are open.
    admin_token_file: Path | None = None
    # Bytes in one gRPC message, each way (gRPC's own default is 4 MiB). A larger
    # request is refused naming this setting, up to twice this size; above that
    # gRPC refuses it itself.
    max_message_bytes: int = 4 * 1024 * 1024
    # Live sessions started by one client (its identity, or its address when
    # auth is off); 0 is no limit beyond max_sessions.
    max_sessions_per_client: int = 0
    log_format: str = "text"  # "text", or "json": one JSON object per line
    # Prometheus metrics over HTTP on this port (same host); None is off, 0 any.
    metrics_port: int | None = None
    # When max_sessions are live, a new session is refused ("refuse") or takes
    # the place of the least recently used one ("evict-lru").
    when_full: str = "refuse"
    # At SIGTERM: seconds health reports NOT_SERVING while calls are still
    # served, for probes and load balancers to stop sending new ones; then
    # seconds that calls in flight have to finish before they are cancelled.
    drain_s: float = 5.0
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "0 to 65535", self.port)
        _require(
            self.max_sessions >= 1, "max_sessions", "at least 1", self.max_sessions
        )
        _require(
            0 <= self.idle_timeout_s < float("inf"),
            "idle_timeout_s",
            "0 (off) or more",
            self.idle_timeout_s,
        )
        _require(
            self.max_batch_size >= 1,
            "max_batch_size",
            "at least 1",
            self.max_batch_size,
        )
        _require(
            0 <= self.max_batch_wait_ms <= 10_000,
            "max_batch_wait_ms",
            "0 (take what is queued) to 10000",
            self.max_batch_wait_ms,
        )
        _require(
            1 <= self.max_timesteps <= 10_000_000,
            "max_timesteps",
            "1 to 10000000",
            self.max_timesteps,
        )
        _require(
            self.max_queued_steps >= 0,
            "max_queued_steps",
            "0 (no limit) or more",
            self.max_queued_steps,
        )
        _require(
            self.worker_threads >= 1,
            "worker_threads",
            "at least 1",
            self.worker_threads,
        )
        executions = ("auto", "tensorflow")
        _require(self.execution in executions, "execution", executions, self.execution)
        storages = ("auto", "host", "tensorflow")
        _require(
            self.state_storage in storages,
            "state_storage",
            storages,
            self.state_storage,
        )
        _require(
            0 <= self.snapshot_interval_s < float("inf"),
            "snapshot_interval_s",
            "0 (only at shutdown) or more",
            self.snapshot_interval_s,
        )
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        _require(self.log_level in levels, "log_level", levels, self.log_level)
        formats = ("text", "json")
        _require(self.log_format in formats, "log_format", formats, self.log_format)
        _require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "metrics_port",
            "off or 0 to 65535",
            self.metrics_port,
        )
        _require(
            not self.port or self.metrics_port != self.port,
            "metrics_port",
            f"a port other than the gRPC port {self.port}",
            self.metrics_port,
        )
        policies = ("refuse", "evict-lru")
        _require(self.when_full in policies, "when_full", policies, self.when_full)
        for name in ("drain_s", "shutdown_grace_s"):
            value = getattr(self, name)
            _require(0 <= value <= 3600, name, "0 to 3600", value)
        self._check_security()

    def _check_security(self) -> None:
        _require(
            0 <= self.model_poll_interval_s <= 86_400,
            "model_poll_interval_s",
            "0 (off) to 86400",
            self.model_poll_interval_s,
        )
        _require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file and tls_key_file",
            "both or neither",
            (self.tls_cert_file, self.tls_key_file),
        )
        _require(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file",
            "set only with tls_cert_file and tls_key_file (mutual TLS needs TLS)",
            self.tls_client_ca_file,
        )
        _require(
            1024 <= self.max_message_bytes <= 2**31 - 1,
            "max_message_bytes",
            "1024 to 2147483647",
            self.max_message_bytes,
        )
        _require(
            self.max_sessions_per_client >= 0,
            "max_sessions_per_client",
            "0 (no limit) or more",
            self.max_sessions_per_client,
        )

    @property
    def auth_enabled(self) -> bool:
        """Whether calls carry an identity: a token, or a client certificate."""
        return self.token_file is not None or self.tls_client_ca_file is not None

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
    ) -> "Config":
        """Flags win over `SEQSERVE_*` variables, which win over the defaults."""
        parser = argparse.ArgumentParser(
            prog="seqserve-server",
            description="Serve stateful Keras RNN models over gRPC.",
            # A prefix accepted today would change meaning when a flag is added.
            allow_abbrev=False,
        )
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            if field.type is bool:
                parser.add_argument(flag, action="store_true", default=None)
            else:
                parser.add_argument(flag, type=str, default=None)
        parsed = vars(parser.parse_args(argv))
        values = {}
        for field in dataclasses.fields(cls):
            raw = parsed[field.name]
            if raw is None:
                raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _convert(field, raw)
        return cls(**values)


def _convert(field: dataclasses.Field, raw: object) -> object:
    if isinstance(raw, bool):
        return raw
    text = str(raw)
    try:
        if field.type is bool:
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if field.type in (Path, Path | None):
            return Path(text)
        if field.type == int | None:
            return None if text.lower() == "off" else int(text)
        return field.type(text)
    except ValueError:
        expected = _KINDS.get(field.type, field.type)
        raise ValueError(
            f"{field.name}: expected {expected}, received {text!r}"
        ) from None


_KINDS = {
    bool: "true or false (also 1/0, yes/no)",
    int: "an integer",
    int | None: "an integer or off",
    float: "a number",
    str: "text",
}


def _require(ok: bool, name: str, expected: object, received: object) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, received {received!r}")
