"""The snapshot format: sessions of one model, as bytes, checked on the way in.

    magic (8 bytes) | SHA-256 of the body (32) | body
    body = header length (4, little-endian) | header (JSON) | arrays

The header names the format version, the model's layout (name, version, state
parts, input and outputs, a digest of its weights) and every session's fields;
arrays are raw little-endian bytes that the header locates. Nothing is
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


class SnapshotRefused(ValueError):
    """Bytes that are not a snapshot we can load; the message says why."""


@dataclasses.dataclass
class SessionRecord:
    id: str
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


def encode(model_layout: dict, records: list[SessionRecord]) -> bytes:
    arrays: list[np.ndarray] = []

    def put(array) -> int:
        arrays.append(np.ascontiguousarray(array))
        return len(arrays) - 1

    units = [part[3] for part in model_layout["state"]]
    states = [
        put(np.array([r.state[i] for r in records], np.float32).reshape(-1, n))
        for i, n in enumerate(units)
    ]
    flags = np.array([r.has_output for r in records], bool)
    flags = flags.reshape(len(records), model_layout["recurrent_layers"])
    header = {
        "format": FORMAT_VERSION,
        "layout": model_layout,
        "sessions": [_session_header(r, put) for r in records],
        "states": states,
        "has_output": put(flags),
    }
    return _pack(header, arrays)


def decode(data: bytes) -> tuple[dict, list[SessionRecord]]:
    """(layout, records); raises SnapshotRefused for anything malformed."""
    body = _verified_body(data)
    try:
        return _parse(body)
    except SnapshotRefused:
        raise
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as error:
        raise SnapshotRefused(f"malformed contents ({type(error).__name__})") from None


def _session_header(record: SessionRecord, put) -> dict:
    reply = record.last_reply
    return {
        "id": record.id,
        "version": record.version,
        "step_number": record.step_number,
        "timesteps": record.timesteps,
        "created_wall_s": record.created_wall_s,
        "last_used_wall_s": record.last_used_wall_s,
        "reply": None
        if reply is None
        else {
            "outputs": [put(x) for x in reply.outputs],
            "state": None if reply.state is None else [put(x) for x in reply.state],
            "timesteps": reply.timesteps,
            "step_number": reply.step_number,
        },
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
    if header["format"] != FORMAT_VERSION:
        raise SnapshotRefused(
            f"format: expected version {FORMAT_VERSION}, received {header['format']!r}"
        )
    arrays = _arrays(header["arrays"], body[4 + length :])
    states = [
        _states_part(arrays[i], part)
        for i, part in zip(header["states"], header["layout"]["state"], strict=True)
    ]
    flags = arrays[header["has_output"]]
    sessions = header["sessions"]
    if flags.dtype != bool or flags.shape != (
        len(sessions),
        header["layout"]["recurrent_layers"],
    ):
        raise SnapshotRefused(f"has_output: unexpected shape {flags.shape}")
    records = [
        _record(s, [part[row] for part in states], flags[row].tolist(), arrays)
        for row, s in enumerate(sessions)
    ]
    return header["layout"], records


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


def _states_part(array: np.ndarray, part: list) -> np.ndarray:
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != part[3]:
        raise SnapshotRefused(
            f"state {part[0]}.{part[2]}: expected float32 [sessions, {part[3]}], "
            f"received {array.dtype} {list(array.shape)}"
        )
    return array


def _record(session: dict, state, has_output, arrays) -> SessionRecord:
    reply = session["reply"]
    if reply is not None:
        state_ids = reply["state"]
        reply = StepResult(
            outputs=[arrays[i] for i in reply["outputs"]],
            state=None if state_ids is None else [arrays[i] for i in state_ids],
            timesteps=int(reply["timesteps"]),
            step_number=int(reply["step_number"]),
        )
    if min(session["step_number"], session["timesteps"]) < 0:
        raise SnapshotRefused("step_number and timesteps: expected 0 or more")
    return SessionRecord(
        id=str(session["id"]),
        version=int(session["version"]),
        step_number=int(session["step_number"]),
        timesteps=int(session["timesteps"]),
        created_wall_s=float(session["created_wall_s"]),
        last_used_wall_s=float(session["last_used_wall_s"]),
        state=state,
        has_output=[bool(x) for x in has_output],
        last_reply=reply,
    )
