"""Hypothesis strategies for malformed (and valid) requests at the protobuf level.

Every strategy draws a `Drawn` value: the message part, plus the status codes
that its problems call for. A request with no problem must succeed; one with
problems must fail with the code of one of them (the server reports the first
it meets, and the order of checks is its own business).
"""

import dataclasses

import numpy as np
from grpc import StatusCode
from hypothesis import strategies as st

from seqserve.v1 import seqserve_pb2 as pb

INVALID = StatusCode.INVALID_ARGUMENT
NOT_FOUND = StatusCode.NOT_FOUND
ALREADY_EXISTS = StatusCode.ALREADY_EXISTS
ABORTED = StatusCode.ABORTED
MAX_TIMESTEPS = 16  # the fuzzed server's --max-timesteps, so "too long" is cheap

ITEMSIZE = {pb.DATA_TYPE_FLOAT32: 4, pb.DATA_TYPE_FLOAT64: 8}
ITEMSIZE |= {pb.DATA_TYPE_INT32: 4, pb.DATA_TYPE_INT64: 8}
NUMPY = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_FLOAT64: "<f8"}
NUMPY |= {pb.DATA_TYPE_INT32: "<i4", pb.DATA_TYPE_INT64: "<i8"}
UNKNOWN_DTYPES = [pb.DATA_TYPE_UNSPECIFIED, 5, 99, -1, 2**31 - 1, -(2**31)]
HUGE = [2**31, 2**32 + 3, 2**62, 2**63 - 1]
ID_ALPHABET = "ABCXYZabcxyz0189._:-"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    dtype: int
    features: tuple[int, ...]  # input shape after the time axis
    parts: tuple[tuple[str, str, int], ...]  # (layer, part, units)
    vocabulary: int | None = None


MODELS = {
    "lstm": ModelSpec(
        "lstm", pb.DATA_TYPE_FLOAT32, (3,), (("lstm", "h", 5), ("lstm", "c", 5))
    ),
    "gru": ModelSpec("gru", pb.DATA_TYPE_FLOAT32, (3,), (("gru", "h", 4),)),
    "tokens": ModelSpec(
        "tokens", pb.DATA_TYPE_INT32, (), (("gru", "h", 4),), vocabulary=6
    ),
}


TARGETS_PER_MODEL = 2


def target_id(model: str, index: int = 0) -> str:
    """The live sessions the fuzzer may address on each model."""
    return f"target-{model}-{index}"


def target_ids() -> list[str]:
    return [target_id(m, i) for m in MODELS for i in range(TARGETS_PER_MODEL)]


@dataclasses.dataclass(frozen=True)
class Drawn:
    value: object
    problems: frozenset = frozenset()  # status codes its problems call for
    model: str | None = None  # for a session id: the target's model, if any

    @property
    def ok(self) -> bool:
        return not self.problems


def expected_codes(*parts: Drawn) -> frozenset:
    problems = frozenset().union(*(p.problems for p in parts))
    return problems or frozenset({StatusCode.OK})


# Session ids -----------------------------------------------------------------


@st.composite
def session_ids(draw, models=tuple(MODELS)) -> Drawn:
    kind = draw(st.sampled_from(["target", "target", "unknown", "malformed", "empty"]))
    if kind == "target":
        model = draw(st.sampled_from(models))
        index = draw(st.integers(0, TARGETS_PER_MODEL - 1))
        return Drawn(target_id(model, index), model=model)
    if kind == "unknown":
        tail = draw(st.text(ID_ALPHABET, min_size=0, max_size=120))
        return Drawn("nobody-" + tail, frozenset({NOT_FOUND}))
    if kind == "empty":
        return Drawn("", frozenset({INVALID}))
    return Drawn(draw(malformed_ids()), frozenset({INVALID}))


def malformed_ids():
    too_long = st.integers(129, 5000).map(lambda n: "x" * n) | long_texts()
    printable = st.characters(exclude_categories=["Cs"])  # protobuf refuses surrogates
    odd = st.text(printable, min_size=1, max_size=40).filter(
        lambda s: any(c not in _ID_CHARS for c in s)
    )
    return st.one_of(too_long, odd)


def long_texts():
    """Names far longer than any error message may echo, ASCII or not."""
    return st.sampled_from(["m", "\u00e9", "\u6f22"]).flatmap(
        lambda c: st.integers(2_000, 60_000).map(lambda n: c * n)
    )


_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


# Tensors ---------------------------------------------------------------------


def array_bytes(dtype: int, shape, seed: int, spec: ModelSpec | None = None) -> bytes:
    """Finite values of `dtype`; token ids inside the vocabulary for `spec`.

    One seed in four gives extreme finite floats: the largest, the smallest
    subnormal, zeros of both signs.
    """
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape, dtype=object))
    if dtype in (pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64):
        high = spec.vocabulary if spec and spec.vocabulary else 1000
        return rng.integers(0, high, count).astype(NUMPY[dtype]).tobytes()
    numpy_dtype = np.dtype(NUMPY.get(dtype, "<f4"))
    if seed % 4 == 0:
        info = np.finfo(numpy_dtype)
        extremes = [info.max, -info.max, info.smallest_subnormal, -0.0, 0.0, 1.0]
        return rng.choice(np.array(extremes, numpy_dtype), count).tobytes()
    return rng.uniform(-100, 100, count).astype(numpy_dtype).tobytes()


def tensor(dtype: int, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


INPUT_FLAWS = [
    "dtype",
    "unknown dtype",
    "bytes",
    "negative",
    "huge",
    "rank",
    "many dimensions",
    "features",
    "zero timesteps",
    "too long",
    "nonfinite",
    "absent",
]


@st.composite
def inputs_for(draw, spec: ModelSpec, lead: tuple[int, ...] = ()) -> Drawn:
    """Inputs [*lead, timesteps, *features] for `spec`, valid or with one flaw."""
    timesteps = draw(st.integers(1, 4))
    shape = [*lead, timesteps, *spec.features]
    seed = draw(st.integers(0, 2**32 - 1))
    flaw = draw(st.sampled_from([None] * len(INPUT_FLAWS) + INPUT_FLAWS))
    if flaw is None:
        return Drawn(
            tensor(spec.dtype, shape, array_bytes(spec.dtype, shape, seed, spec))
        )
    if flaw == "absent":
        return Drawn(None, frozenset({INVALID}))
    return Drawn(draw(flawed_inputs(spec, shape, seed, flaw)), frozenset({INVALID}))


@st.composite
def flawed_inputs(draw, spec: ModelSpec, shape: list[int], seed: int, flaw: str):
    dtype, time_axis = spec.dtype, len(shape) - 1 - len(spec.features)
    if flaw == "dtype":
        dtype = draw(st.sampled_from([d for d in ITEMSIZE if d != spec.dtype]))
    elif flaw == "unknown dtype":
        dtype = draw(st.sampled_from(UNKNOWN_DTYPES))
        return tensor(dtype, shape, bytes(4 * int(np.prod(shape))))
    elif flaw in ("negative", "huge"):
        axis = draw(st.integers(0, len(shape) - 1))
        size = (
            draw(st.sampled_from(HUGE))
            if flaw == "huge"
            else -draw(st.sampled_from([1, 2, 3, *HUGE]))
        )
        data = draw(st.binary(max_size=64))
        return tensor(dtype, [*shape[:axis], size, *shape[axis + 1 :]], data)
    elif flaw == "many dimensions":  # numpy takes at most 64
        rank = draw(st.integers(65, 20_000))
        size = draw(st.sampled_from([1, 1, 2, 2**40]))
        return tensor(dtype, [size] * rank, draw(st.binary(max_size=16)))
    elif flaw == "rank":
        # A rank the model never takes: one axis fewer or one more.
        shape = draw(st.sampled_from([shape[:-1], [*shape, 1], [1, *shape]]))
    elif flaw == "features":
        change = draw(st.sampled_from([-1, 1, 2]))
        features = [f + change for f in spec.features] or [1]
        shape = [*shape[: time_axis + 1], *features]
    elif flaw == "zero timesteps":
        shape[time_axis] = 0
    elif flaw == "too long":
        shape[time_axis] = draw(st.integers(MAX_TIMESTEPS + 1, MAX_TIMESTEPS + 8))
    data = array_bytes(dtype, shape, seed, spec)
    if flaw == "bytes":
        data = draw(st.binary(max_size=80).filter(lambda b: len(b) != len(data)))
    elif flaw == "nonfinite":
        data = _spoil(draw, spec, dtype, data)
    return tensor(dtype, shape, data)


def _spoil(draw, spec: ModelSpec, dtype: int, data: bytes) -> bytes:
    """One value NaN or infinite, or a token id outside the vocabulary."""
    values = np.frombuffer(data, NUMPY[dtype]).copy()
    if not len(values):
        return data  # nothing to spoil; the request has another flaw
    index = draw(st.integers(0, len(values) - 1))
    if spec.vocabulary is None:
        values[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        values[index] = draw(
            st.sampled_from([-1, spec.vocabulary, 2**31 - 1, -(2**31)])
        )
    return values.tobytes()


# States ----------------------------------------------------------------------

STATE_FLAWS = [
    "missing",
    "extra",
    "twice",
    "units",
    "dtype",
    "nonfinite",
    "bytes",
    "wrong model",
    "empty",
    "long name",
]


@st.composite
def states_for(draw, spec: ModelSpec) -> Drawn:
    """A whole state for `spec`, valid or with one flaw."""
    seed = draw(st.integers(0, 2**32 - 1))
    parts = [
        (layer, part, tensor(pb.DATA_TYPE_FLOAT32, [units], _state_bytes(units, seed)))
        for layer, part, units in spec.parts
    ]
    flaw = draw(st.sampled_from([None, None, *STATE_FLAWS]))
    if flaw == "wrong model":
        other = draw(
            st.sampled_from([m for m in MODELS.values() if m.parts != spec.parts])
        )
        parts = [
            (layer, part, tensor(pb.DATA_TYPE_FLOAT32, [u], _state_bytes(u, seed)))
            for layer, part, u in other.parts
        ]
    elif flaw is not None:
        parts = _flawed_parts(draw, parts, flaw)
    message = pb.State(
        parts=[pb.StatePart(layer=y, part=p, value=v) for y, p, v in parts]
    )
    return Drawn(message, frozenset({INVALID}) if flaw else frozenset())


def _flawed_parts(draw, parts, flaw: str):
    index = draw(st.integers(0, len(parts) - 1))
    layer, part, value = parts[index]
    units = value.shape[0]
    if flaw == "missing":
        return parts[:index] + parts[index + 1 :]
    if flaw == "empty":
        return []
    if flaw == "extra":
        known = {(p[0], p[1]) for p in parts}
        unknown = [(layer, "x"), ("encoder", "h"), ("", ""), (layer, "c")]
        extra = draw(st.sampled_from([key for key in unknown if key not in known]))
        return [*parts, (*extra, value)]
    if flaw == "long name":
        long = draw(long_texts())
        return [
            *parts,
            *draw(st.sampled_from([[(long, part, value)], [(layer, long, value)]])),
        ]
    if flaw == "twice":
        return parts + [parts[index]]
    if flaw == "units":
        units = draw(st.sampled_from([0, units - 1, units + 1]))
        value = tensor(pb.DATA_TYPE_FLOAT32, [units], _state_bytes(units, 0))
    elif flaw == "dtype":
        dtype = draw(st.sampled_from([pb.DATA_TYPE_FLOAT64, pb.DATA_TYPE_INT32, 7]))
        value = tensor(dtype, [units], bytes(ITEMSIZE.get(dtype, 4) * units))
    elif flaw == "nonfinite":
        values = np.frombuffer(value.data, "<f4").copy()
        values[draw(st.integers(0, units - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        value = tensor(pb.DATA_TYPE_FLOAT32, [units], values.tobytes())
    elif flaw == "bytes":
        value = tensor(pb.DATA_TYPE_FLOAT32, [units], value.data[:-1])
    return [*parts[:index], (layer, part, value), *parts[index + 1 :]]


def _state_bytes(units: int, seed: int) -> bytes:
    return array_bytes(pb.DATA_TYPE_FLOAT32, [units], seed)
