"""The snapshot format: sessions of one model, as bytes, checked on the way in.

    magic (8 bytes) | SHA-256 of the body (32) | body
    body = header length (4, little-endian) | header (JSON) | arrays

The header names the format version, the model's layout (name, version, state
parts, input and outputs, a digest of its weights) and the session ids; the
sessions' numbers, states and kept replies are raw little-endian arrays that
the header locates. Nothing is
unpickled: bytes from a client (ImportSession) are as safe to read as our own.
"""

import dataclasses
import hashlib
import json
import math
import struct

import numpy as np

from .executor import StepResult
from .models import ServedModel

MAGIC = b"SEQSNAP\x00"
FORMAT_VERSION = 1
DTYPES = ("<f4", "<f8", "<i4", "<i8", "|b1")
_DIGEST_BYTES = 32
# Step numbers and timestep counts above this are refused: a session that
# continues from one must still count up within int64.
MAX_COUNT = 2**62
# Wall-clock times are seconds since 1970 and before 2242 (2**33 s).
MAX_WALL_S = 2.0**33


class SnapshotRefused(ValueError):
    """Bytes that are not a snapshot we can load; the message says why."""


# Per-session numbers, stored as one array each.
COLUMNS = {
    "versions": np.int64,
    "step_numbers": np.int64,
    "timesteps": np.int64,
    "created_wall_s": np.float64,
    "last_used_wall_s": np.float64,
}


@dataclasses.dataclass
class Capture:
    """The sessions of one model in columns (row i is ids[i]), as read in one
    operation on its executor: cheap to take for many sessions."""

    ids: list[str]
    owners: list[str | None]  # the identity that may use it; None: anyone
    clients: list[str]  # what the per-client session limit counts
    versions: list[int]
    step_numbers: list[int]
    timesteps: list[int]
    created_wall_s: np.ndarray
    last_used_wall_s: np.ndarray
    states: list[np.ndarray]  # per state part, [sessions, units] float32
    has_output: np.ndarray  # [sessions, recurrent layers] bool
    replies: dict[int, StepResult]  # row: the kept reply of its last step


@dataclasses.dataclass
class SessionRecord:
    """One session, as read back."""

    id: str
    owner: str | None
    client: str
    version: int
    step_number: int
    timesteps: int
    created_wall_s: float
    last_used_wall_s: float
    state: list[np.ndarray]  # per state part, [units] float32
    has_output: list[bool]  # per recurrent layer
    last_reply: StepResult | None  # of the last step, when it was numbered


def layout(model: ServedModel) -> dict:
    """What a snapshot must match to be loaded into `model`."""
    return {
        "model": model.name,
        "version": model.version,
        "state": [[p.layer, p.layer_type, p.part, p.units] for p in model.state_parts],
        "recurrent_layers": model.recurrent_layers,
        "input": [model.input.dtype.str, list(model.input.shape)],
        "outputs": [[o.name, o.dtype.str, list(o.shape)] for o in model.outputs],
        "weights_sha256": model.weights_digest,
    }


def check_layout(found: dict, model: ServedModel) -> None:
    expected = layout(model)
    for key, value in expected.items():
        if found.get(key) != value:
            raise SnapshotRefused(
                f"{key}: the loaded model {model.name!r} has {value!r}, the "
                f"snapshot has {found.get(key)!r}; it was taken of another model"
            )


def encode(model_layout: dict, capture: Capture) -> bytes:
    arrays: list[np.ndarray] = []

    def put(array) -> int:
        arrays.append(np.ascontiguousarray(array))
        return len(arrays) - 1

    header = {
        "format": FORMAT_VERSION,
        "layout": model_layout,
        "ids": capture.ids,
        "owners": capture.owners,
        "clients": capture.clients,
        "columns": {
            name: put(np.asarray(getattr(capture, name), dtype))
            for name, dtype in COLUMNS.items()
        },
        "states": [put(part) for part in capture.states],
        "has_output": put(capture.has_output),
        "replies": [[row, _reply_header(r, put)] for row, r in capture.replies.items()],
    }
    return _pack(header, arrays)


def decode(data: bytes) -> tuple[dict, list[SessionRecord]]:
    """(layout, records); raises SnapshotRefused for anything malformed."""
    body = _verified_body(data)
    try:
        return _parse(body)
    except SnapshotRefused:
        raise
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        OverflowError,
        RecursionError,  # JSON nested too deep
    ) as error:
        raise SnapshotRefused(f"malformed contents ({type(error).__name__})") from None


def _reply_header(reply: StepResult, put) -> dict:
    return {
        "outputs": [put(x) for x in reply.outputs],
        "state": None if reply.state is None else [put(x) for x in reply.state],
        "timesteps": reply.timesteps,
        "step_number": reply.step_number,
    }


def _pack(header: dict, arrays: list[np.ndarray]) -> bytes:
    offset, table = 0, []
    for array in arrays:
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        table.append([array.dtype.str, list(array.shape), offset])
        offset += array.nbytes
    header["arrays"] = table
    text = json.dumps(header, separators=(",", ":")).encode()
    parts = [struct.pack("<I", len(text)), text]
    parts += [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays]
    body = b"".join(parts)
    return MAGIC + hashlib.sha256(body).digest() + body


def _verified_body(data: bytes) -> memoryview:
    view = memoryview(data)
    start = len(MAGIC) + _DIGEST_BYTES
    if len(view) < start + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise SnapshotRefused(
            f"expected a seqserve snapshot (magic {MAGIC!r}), received "
            f"{len(view)} bytes that do not start with it"
        )
    body = view[start:]
    if hashlib.sha256(body).digest() != bytes(view[len(MAGIC) : start]):
        raise SnapshotRefused(
            "checksum mismatch: the bytes are truncated or corrupt (a write that "
            "did not finish, or a damaged copy)"
        )
    return body


def _parse(body: memoryview) -> tuple[dict, list[SessionRecord]]:
    (length,) = struct.unpack("<I", body[:4])
    header = json.loads(bytes(body[4 : 4 + length]))
    version = header["format"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise SnapshotRefused(
            f"format: expected version {FORMAT_VERSION}, received {version!r}"
        )
    arrays = _arrays(header["arrays"], body[4 + length :])
    found = header["layout"]
    if not isinstance(found, dict):
        raise SnapshotRefused(f"layout: expected an object, received {found!r}")
    ids = _texts(header["ids"], "ids")
    sessions = len(ids)
    owners = _texts(header["owners"], "owners", sessions, none_allowed=True)
    clients = _texts(header["clients"], "clients", sessions)
    columns = {
        name: _column(arrays[i], name, sessions)
        for name, i in header["columns"].items()
    }
    if sorted(columns) != sorted(COLUMNS):
        raise SnapshotRefused(f"columns: expected {sorted(COLUMNS)}")
    states = [
        _states_part(arrays[i], part, sessions)
        for i, part in zip(header["states"], found["state"], strict=True)
    ]
    flags = arrays[header["has_output"]]
    if flags.dtype != bool or flags.shape != (sessions, found["recurrent_layers"]):
        raise SnapshotRefused(f"has_output: unexpected shape {flags.shape}")
    replies = {}
    for row, reply in header["replies"]:
        if type(row) is not int or not 0 <= row < sessions or row in replies:
            raise SnapshotRefused(
                f"replies: expected distinct rows below {sessions}, received {row!r}"
            )
        replies[row] = _reply(reply, arrays)
    records = [
        _record(ids[row], {k: v[row] for k, v in columns.items()}, replies.get(row))
        for row in range(sessions)
    ]
    for row, record in enumerate(records):
        if record.version != found["version"]:
            raise SnapshotRefused(
                f"session {record.id!r}: expected the layout's version "
                f"{found['version']!r}, received {record.version}"
            )
        record.owner, record.client = owners[row], clients[row]
        record.state = [part[row] for part in states]
        record.has_output = flags[row].tolist()
    return found, records


def _texts(values, what: str, count: int | None = None, none_allowed=False) -> list:
    """A list of strings (or None where allowed), `count` long when given."""
    if (
        not isinstance(values, list)
        or (count is not None and len(values) != count)
        or not all(isinstance(v, str) or (none_allowed and v is None) for v in values)
    ):
        expected = "a string or null" if none_allowed else "a string"
        raise SnapshotRefused(f"{what}: expected {expected} for each session")
    return values


def _column(array: np.ndarray, name: str, sessions: int) -> list:
    if array.dtype != COLUMNS[name] or array.shape != (sessions,):
        raise SnapshotRefused(
            f"{name}: expected {np.dtype(COLUMNS[name])} [{sessions}], received "
            f"{array.dtype} {list(array.shape)}"
        )
    return array.tolist()


def _count(value, what: str, low: int = 0) -> int:
    """An integer (not a boolean) from `low` to MAX_COUNT."""
    if type(value) is not int or not low <= value <= MAX_COUNT:
        raise SnapshotRefused(
            f"{what}: expected an integer from {low} to 2**62, received {value!r}"
        )
    return value


def _arrays(table: list, blob: memoryview) -> list[np.ndarray]:
    arrays = []
    for dtype, shape, offset in table:
        if dtype not in DTYPES or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise SnapshotRefused(f"unexpected array {dtype!r} of shape {shape!r}")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if not 0 <= offset <= len(blob) - size:
            raise SnapshotRefused("an array lies outside the snapshot")
        chunk = blob[offset : offset + size]
        arrays.append(np.frombuffer(chunk, dtype).reshape(shape).copy())
    return arrays


def _states_part(array: np.ndarray, part: list, sessions: int) -> np.ndarray:
    if array.dtype != np.float32 or array.shape != (sessions, part[3]):
        raise SnapshotRefused(
            f"state {part[0]}.{part[2]}: expected float32 [{sessions}, {part[3]}], "
            f"received {array.dtype} {list(array.shape)}"
        )
    return array


def _reply(reply: dict, arrays) -> StepResult:
    state_ids = reply["state"]
    return StepResult(
        outputs=[arrays[i] for i in reply["outputs"]],
        state=None if state_ids is None else [arrays[i] for i in state_ids],
        timesteps=_count(reply["timesteps"], "reply timesteps", 1),
        step_number=_count(reply["step_number"], "reply step_number", 1),
    )


def _record(session_id: str, values: dict, reply) -> SessionRecord:
    for name in ("created_wall_s", "last_used_wall_s"):
        if not 0 <= values[name] < MAX_WALL_S:  # also refuses NaN
            raise SnapshotRefused(
                f"session {session_id!r}: {name} expected seconds since 1970, "
                f"received {values[name]!r}"
            )
    return SessionRecord(
        id=session_id,
        owner=None,
        client="",
        version=_count(values["versions"], "version", 1),
        step_number=_count(values["step_numbers"], "step_number"),
        timesteps=_count(values["timesteps"], "timesteps"),
        created_wall_s=values["created_wall_s"],
        last_used_wall_s=values["last_used_wall_s"],
        state=[],
        has_output=[],
        last_reply=reply,
    )
