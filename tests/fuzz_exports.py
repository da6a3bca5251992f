"""Hypothesis strategies for ImportSession bytes, drawn from one real export.

A snapshot carries a SHA-256 of its body, so flipped or cut bytes only ever
meet the checksum. To reach the parser behind it, most draws change the
decoded header (any value anywhere in its JSON) or the raw arrays, and then
pack the result again with a correct checksum: what a careless or hostile
client could send.
"""

import hashlib
import json
import math
import struct

from grpc import StatusCode
from hypothesis import strategies as st

from fuzz_requests import ALREADY_EXISTS, INVALID, NOT_FOUND, Drawn

MAGIC_AND_DIGEST = 8 + 32  # see server/snapshot_format.py
# What a changed header may call for: refused, another model or version, an id
# that is taken, or, when the change does not matter (a client name), a session.
ANY_OUTCOME = frozenset({INVALID, NOT_FOUND, ALREADY_EXISTS, StatusCode.OK})


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, arrays) of a snapshot."""
    body = data[MAGIC_AND_DIGEST:]
    (length,) = struct.unpack("<I", body[:4])
    return json.loads(body[4 : 4 + length]), body[4 + length :]


def pack(magic: bytes, header: bytes, arrays: bytes) -> bytes:
    body = struct.pack("<I", len(header)) + header + arrays
    return magic + hashlib.sha256(body).digest() + body


def json_values():
    """Any JSON value, the odd ones often: huge and non-finite numbers, deep
    nesting, wrong types."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([0, 1, 2, -1, 2**31, 2**62 + 1, 2**63, -(2**63), 10**30]),
        st.integers(),
        st.sampled_from([0.5, -0.0, 1e308, math.nan, math.inf, -math.inf]),
        st.text(max_size=20),
        st.sampled_from(["<f4", "<f8", "|b1", ">f4", "O", "basic_motions", "h"]),
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _paths(value, prefix=()):
    """Every place in a JSON value, as a path of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def import_bytes(draw, export: bytes) -> Drawn:
    """Bytes for ImportSession: `export` itself (valid: its session has ended),
    or `export` spoiled in one of several ways, with the codes that may follow."""
    magic = export[:8]
    header, arrays = split(export)
    kind = draw(
        st.sampled_from(
            ["valid", "random", "cut", "flip", "header", "header", "arrays", "text"]
        )
    )
    if kind == "valid":
        return Drawn(export)
    if kind == "random":
        noise = draw(st.binary(max_size=200))
        return Drawn(
            draw(st.sampled_from([noise, magic + noise])), frozenset({INVALID})
        )
    if kind == "cut":
        cut = draw(st.integers(0, len(export) - 1))
        return Drawn(export[:cut], frozenset({INVALID}))
    if kind == "flip":
        index = draw(st.integers(0, len(export) - 1))
        flipped = bytearray(export)
        flipped[index] ^= draw(st.integers(1, 255))
        return Drawn(bytes(flipped), frozenset({INVALID}))
    if kind == "text":  # not JSON, or JSON that is not an object
        text = draw(
            st.binary(max_size=40)
            | st.sampled_from([b"[]", b"null", b"1", b'"x"', b"[" * 50_000])
        )
        return Drawn(pack(magic, text, arrays), frozenset({INVALID}))
    if kind == "arrays":
        spoiled = bytearray(arrays)
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(spoiled) - 1))
            spoiled[index] = draw(st.integers(0, 255))
        # A state value may stay finite, or a reply output still fit: then it
        # imports; NaN, a wrong step count, a bad flag or time is refused.
        return Drawn(pack(magic, _text(header), bytes(spoiled)), ANY_OUTCOME)
    path = draw(st.sampled_from(list(_paths(header))))
    changed = _replaced(header, path, draw(json_values()))
    return Drawn(pack(magic, _text(changed), arrays), ANY_OUTCOME)


def _text(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()
