"""Unit tests of request checks and tensor decoding, without gRPC or a model."""

import types

import numpy as np
import pytest

from seqserve.server import tensors
from seqserve.server.errors import InvalidArgument
from seqserve.server.models import StatePartSpec, TensorSpec
from seqserve.server.validation import check_inputs, check_state
from seqserve.v1 import seqserve_pb2 as pb

UNITS = 4
MODEL = types.SimpleNamespace(
    name="m",
    input=TensorSpec("frames", np.dtype("float32"), (-1, 3)),
    state_parts=(
        StatePartSpec("enc", "LSTM", "h", UNITS),
        StatePartSpec("enc", "LSTM", "c", UNITS),
        StatePartSpec("dec", "GRU", "h", UNITS + 1),
    ),
)
TOKENS = types.SimpleNamespace(
    name="t", input=TensorSpec("tokens", np.dtype("int32"), (-1,)), state_parts=()
)


def test_check_inputs_returns_good_inputs_unchanged():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert check_inputs(MODEL, x) is x
    tokens = np.array([0, 5, 2], np.int32)
    assert check_inputs(TOKENS, tokens) is tokens


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 3), np.float64),
        np.zeros((2, 3), np.int32),
        np.zeros(3, np.float32),
        np.zeros((1, 2, 3), np.float32),
        np.zeros((2, 4), np.float32),
        np.zeros((0, 3), np.float32),
        np.array([[0, 0, np.nan]], np.float32),
        np.array([[0, np.inf, 0]], np.float32),
        np.array([[-np.inf, 0, 0]], np.float32),
    ],
    ids=["f64", "i32", "rank1", "rank3", "width4", "empty", "nan", "inf", "-inf"],
)
def test_check_inputs_refuses(x):
    with pytest.raises(InvalidArgument):
        check_inputs(MODEL, x)


def test_check_inputs_refuses_floats_and_other_ints_for_tokens():
    for x in (np.ones(3, np.float32), np.ones(3, np.int64), np.ones((3, 1), np.int32)):
        with pytest.raises(InvalidArgument):
            check_inputs(TOKENS, x)


def part(units, value=0.5, dtype=np.float32):
    return np.full(units, value, dtype)


GOOD = [
    ("dec", "h", part(UNITS + 1, 3.0)),
    ("enc", "c", part(UNITS, 2.0)),
    ("enc", "h", part(UNITS, 1.0)),
]


def test_check_state_returns_parts_in_the_models_order():
    values = check_state(MODEL, GOOD, "state")
    assert [v[0] for v in values] == [1.0, 2.0, 3.0]


def replaced(index, value):
    entries = list(GOOD)
    layer, name, _ = entries[index]
    entries[index] = (layer, name, value)
    return entries


@pytest.mark.parametrize(
    "entries",
    [
        [],
        GOOD[:2],
        [*GOOD, GOOD[0]],
        [*GOOD, ("enc", "x", part(UNITS))],
        [*GOOD[:2], ("enc", "h", part(UNITS)), ("other", "h", part(UNITS))],
        replaced(2, part(UNITS + 1)),
        replaced(2, part(UNITS - 1)),
        replaced(2, np.zeros((1, UNITS), np.float32)),
        replaced(2, np.zeros((2, UNITS), np.float32)),
        replaced(2, np.float32(0)),
        replaced(2, part(UNITS, dtype=np.float64)),
        replaced(0, part(UNITS + 1, np.nan)),
        replaced(1, part(UNITS, np.inf)),
    ],
    ids=[
        "none",
        "missing",
        "twice",
        "unknown part",
        "unknown layer",
        "units+1",
        "units-1",
        "batch 1",
        "batch 2",
        "scalar",
        "float64",
        "nan",
        "inf",
    ],
)
def test_check_state_refuses(entries):
    with pytest.raises(InvalidArgument):
        check_state(MODEL, entries, "state")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (1, 0, 4)])
def test_decode_round_trips_every_dtype_and_shape(dtype, shape):
    x = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    decoded = tensors.decode(tensors.encode(x), "x")
    assert decoded.dtype == x.dtype and decoded.shape == x.shape
    np.testing.assert_array_equal(decoded, x)


def test_decode_reads_little_endian_bytes_as_a_read_only_view():
    big = np.array([1.5, -2.0], dtype=">f4")
    decoded = tensors.decode(tensors.encode(big), "x")
    np.testing.assert_array_equal(decoded, [1.5, -2.0])
    assert not decoded.flags.writeable


@pytest.mark.parametrize(
    "dtype, shape, data",
    [
        (pb.DATA_TYPE_UNSPECIFIED, [1], bytes(4)),
        (99, [1], bytes(4)),
        (pb.DATA_TYPE_FLOAT32, [-1], b""),
        (pb.DATA_TYPE_FLOAT32, [-1, -1], bytes(4)),
        (pb.DATA_TYPE_FLOAT32, [2], bytes(4)),
        (pb.DATA_TYPE_FLOAT32, [2], bytes(9)),
        (pb.DATA_TYPE_INT64, [2], bytes(8)),
        (pb.DATA_TYPE_FLOAT32, [0, 2**62], b""),
        (pb.DATA_TYPE_FLOAT32, [2**40, 0, 2**40], b""),
        (pb.DATA_TYPE_FLOAT64, [2**32, 2**32], b""),
    ],
    ids=[
        "unspecified",
        "unknown enum",
        "negative",
        "negative pair",
        "short",
        "long",
        "int64 short",
        "empty but huge",
        "empty but huge around zero",
        "product past 2**64",
    ],
)
def test_decode_refuses(dtype, shape, data):
    with pytest.raises(InvalidArgument):
        tensors.decode(pb.Tensor(dtype=dtype, shape=shape, data=data), "x")
