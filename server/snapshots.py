"""Durable sessions: snapshot files, their restore at start, export and import.

Each model's sessions are read in one operation on its executor, so a snapshot
holds no half-applied step; the file is then written beside the old one,
flushed, fsynced and renamed over it, and the directory fsynced, so a crash
leaves the old snapshot or the new one, never a mix. A file that is corrupt,
truncated, or taken of another model is refused with one log line, moved
aside, and the server starts without its sessions.
"""

import contextlib
import functools
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from .errors import InvalidArgument, NotFound, SeqServeError
from .logs import about
from .models import ServedModel
from .sessions import Session
from .snapshot_format import (
    Capture,
    SessionRecord,
    SnapshotRefused,
    check_layout,
    decode,
    encode,
    layout,
)
from .validation import check_state

log = logging.getLogger(__name__)

SUFFIX = ".snapshot"


def export_session(core, session: Session) -> bytes:
    model = core.model(session.model, session.version)
    capture = core.run_on_model(model, functools.partial(_read, [session]))
    if not capture.ids:
        raise NotFound(f"session {session.id!r} ended while it was being exported")
    return encode(layout(model), capture)


def import_session(
    core, data: bytes, caller: str | None = None, client: str = ""
) -> tuple[Session, ServedModel]:
    """Creates the session the bytes describe; nothing changes if it is refused."""
    try:
        found, records = decode(data)
    except SnapshotRefused as error:
        raise InvalidArgument(f"session: {error}") from None
    if len(records) != 1:
        raise InvalidArgument(
            f"session: expected one exported session, received {len(records)}"
        )
    model = core.model(str(found.get("model", "")), _version(found))
    try:
        check_layout(found, model)
    except SnapshotRefused as error:
        raise InvalidArgument(f"session: {error}") from None
    return adopt(core, model, records[0], "imported", caller, client), model


def _version(found: dict) -> int:
    version = found.get("version")
    if type(version) is not int or version < 1:  # True is an int too
        raise InvalidArgument(f"session: expected a model version, found {version!r}")
    return version


def adopt(
    core,
    model: ServedModel,
    record: SessionRecord,
    reason: str = "new",
    caller: str | None = None,
    client: str = "",
) -> Session:
    """Makes `record` a live session of `model` (its layout already checked);
    `reason` is "restored" for a session from a snapshot file, "imported" for
    one from ImportSession."""
    parts = [(p.layer, p.part, v) for p, v in zip(model.state_parts, record.state)]
    check_state(model, parts, "session state")
    _check_reply(model, record)
    model = core.versions.acquire(model.name, model.version)  # counts the session
    try:
        session = core.sessions.add(model.name, record.id, caller, client)
    except BaseException:
        core.versions.release((model.name, model.version))
        raise
    session.version = model.version
    session.created_s = _monotonic(record.created_wall_s)
    session.last_used_s = _monotonic(record.last_used_wall_s)
    install = functools.partial(_install, session, record)
    try:
        core.run_on_model(model, install, [session])
    except BaseException:
        core.sessions.discard(session)
        core.versions.release((model.name, model.version))
        raise
    core.sessions.activate(session)
    core.metrics.session_started(model.name, reason)
    log.debug(
        "session %s at step %d", reason, session.step_number, extra=about(session)
    )
    return session


def _check_reply(model: ServedModel, record: SessionRecord) -> None:
    """A kept reply is sent again as it is: it must be one this model gives, of
    the session's last step."""
    reply = record.last_reply
    if reply is None:
        return
    if reply.step_number != record.step_number or reply.timesteps != record.timesteps:
        raise InvalidArgument(
            f"session last reply: expected step {record.step_number} after "
            f"{record.timesteps} timesteps, received step {reply.step_number} "
            f"after {reply.timesteps}"
        )
    for spec, value in zip(model.outputs, reply.outputs, strict=False):
        if not _fits(value, spec.dtype, spec.shape, reply.timesteps):
            steps = f" (-1: 1 to {reply.timesteps})" if -1 in spec.shape else ""
            raise InvalidArgument(
                f"session last reply output {spec.name!r}: expected {spec.dtype} "
                f"{list(spec.shape)}{steps}, received {value.dtype} "
                f"{list(value.shape)}"
            )
    parts = model.state_parts
    if len(reply.outputs) != len(model.outputs) or not (
        reply.state is None
        or len(reply.state) == len(parts)
        and all(_fits(x, np.float32, (p.units,), 0) for x, p in zip(reply.state, parts))
    ):
        raise InvalidArgument(
            f"session last reply: expected {len(model.outputs)} outputs and, if "
            f"any, {len(parts)} float32 state parts"
        )


def _fits(value: np.ndarray, dtype, shape: tuple, timesteps: int) -> bool:
    """`value` has `dtype` and `shape`, whose -1 stands for 1 to `timesteps`."""
    return (
        value.dtype == dtype
        and value.ndim == len(shape)
        and all(
            1 <= n <= timesteps if want == -1 else n == want
            for n, want in zip(value.shape, shape)
        )
    )


def _read(sessions: list[Session], store) -> Capture:
    """On the executor thread: the sessions still live, in columns."""
    live = [s for s in sessions if not s.released]
    slots = np.fromiter((s.slot for s in live), np.intp, len(live))
    states, has_output = store.gather(slots)
    to_wall_s = time.time() - time.monotonic()
    return Capture(
        ids=[s.id for s in live],
        owners=[s.owner for s in live],
        clients=[s.client for s in live],
        versions=[s.version for s in live],
        step_numbers=[s.step_number for s in live],
        timesteps=[s.timesteps for s in live],
        created_wall_s=np.array([s.created_s for s in live]) + to_wall_s,
        last_used_wall_s=np.array([s.last_used_s for s in live]) + to_wall_s,
        states=[np.asarray(part) for part in states],
        has_output=np.stack([np.asarray(h) for h in has_output], axis=1),
        replies={
            row: s.last_reply for row, s in enumerate(live) if s.last_reply is not None
        },
    )


def _install(session: Session, record: SessionRecord, store) -> None:
    """On the executor thread: gives the session a row holding the record."""
    session.slot = store.allocate()
    slots = np.array([session.slot], np.intp)
    states = [np.asarray(part, np.float32)[None] for part in record.state]
    flags = [np.array([flag]) for flag in record.has_output]
    store.scatter(slots, states, flags)
    session.timesteps = record.timesteps
    session.step_number = record.step_number
    session.last_reply = record.last_reply


def _monotonic(wall_s: float) -> float:
    return time.monotonic() - (time.time() - wall_s)


class Snapshotter:
    """Writes every model's sessions to `directory`: every `interval_s` seconds
    (0: only when `write_all` is called) and on `write_all`. Thread-safe."""

    def __init__(self, core, directory: Path, interval_s: float):
        self.core = core
        self.directory = directory
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = None
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f".*{SUFFIX}.tmp"):
            leftover.unlink()  # a write that a crash interrupted

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(
                target=self._loop, name="snapshotter", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stops the periodic writes (a final `write_all` is the caller's)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def write_all(self) -> tuple[int, int]:
        """Writes one snapshot per model version; returns the sessions written
        and those not written (of versions whose write failed: their last
        snapshot stays)."""
        written = unwritten = 0
        with self._lock:
            kept = set()
            for model in self.core.versions.all():
                path = self.directory / f"{model.name}@{model.version}{SUFFIX}"
                kept.add(path)
                sessions = [
                    s
                    for s in self.core.sessions.started(model.name)
                    if s.version == model.version
                ]
                try:
                    written += self._write(model, sessions, path)
                except Exception as error:  # a full disk, say: keep serving, and trying
                    unwritten += len(sessions)
                    log.error(
                        "snapshot of model %r version %d (%d sessions) failed: %s; "
                        "its last snapshot stays",
                        model.name,
                        model.version,
                        len(sessions),
                        error,
                        exc_info=not isinstance(error, OSError),  # OSError: as said
                    )
            for stale in set(self.directory.glob(f"*{SUFFIX}")) - kept:
                with contextlib.suppress(OSError):  # tried again next time
                    stale.unlink()  # of a version unloaded since: its sessions ended
        return written, unwritten

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            started = time.monotonic()
            written, _ = self.write_all()
            log.debug(
                "snapshot of %d sessions took %.1f ms",
                written,
                1000 * (time.monotonic() - started),
            )

    def _write(self, model: ServedModel, sessions: list, path: Path) -> int:
        capture = self.core.run_on_model(model, functools.partial(_read, sessions))
        write_atomically(path, encode(layout(model), capture))
        return len(capture.ids)


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def restore_all(core, directory: Path) -> int:
    """Restores every snapshot file in `directory`; returns the sessions restored."""
    restored = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            restored += _restore(core, path)
        except SnapshotRefused as error:
            aside = _aside(path)
            path.replace(aside)
            log.error(
                "snapshot %s refused: %s; starting without its sessions (file kept "
                "as %s)",
                path,
                error,
                aside.name,
            )
    return restored


def _aside(path: Path) -> Path:
    """`<name>.refused-<time in ns>`, unique: an earlier refusal is never replaced."""
    stamp = time.time_ns()
    while (aside := path.with_name(f"{path.name}.refused-{stamp}")).exists():
        stamp += 1  # a coarse clock, or refusals within one tick
    return aside


def _restore(core, path: Path) -> int:
    try:
        found, records = decode(path.read_bytes())
    except OSError as error:
        raise SnapshotRefused(f"unreadable ({error.strerror})") from None
    try:
        model = core.model(str(found.get("model")), _version(found))
    except (SeqServeError, TypeError, ValueError):
        raise SnapshotRefused(
            f"model {found.get('model')!r} version {found.get('version')!r} is not "
            "loaded"
        ) from None
    check_layout(found, model)
    restored = 0
    for record in records:
        try:
            adopt(core, model, record, "restored", record.owner, record.client)
            restored += 1
        except SeqServeError as error:
            log.warning("session %r not restored from %s: %s", record.id, path, error)
    log.info("restored %d sessions of model %r from %s", restored, model.name, path)
    return restored
