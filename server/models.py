"""Loads model files, checks that they stream, and runs them on batches.

Each model file becomes one `ServedModel` (which files, and which version each
is, is `model_versions`' business). A file that cannot be served is refused
with a log line that names the layer and why; the others still load.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np

from .errors import ModelRefused
from .fastpath import compile_numpy
from .program import StepProgram
from .streamability import analyse

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".keras", ".h5")
INPUT_DTYPES = ("float32", "float64", "int32", "int64")
SELF_CHECK_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class StatePartSpec:
    layer: str
    layer_type: str
    part: str
    units: int


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # for one session; -1 marks the time axis


class ServedModel:
    """A loaded model that streams; `run` is safe from one thread at a time."""

    def __init__(
        self,
        name: str,
        model: keras.Model,
        allow_unsafe: bool,
        execution: str = "auto",
        version: int = 1,
    ):
        self.name = name
        self.version = version  # sessions stay on the version they started with
        analysis = analyse(model, allow_unsafe)
        self.outputs_per_timestep = analysis.outputs_per_timestep
        self.state_parts = tuple(
            StatePartSpec(r.name, type(r.layer).__name__, part, r.units)
            for r in analysis.recurrent
            for part in r.parts
        )
        self.recurrent_layers = len(analysis.recurrent)
        self.input = _input_spec(model)
        # Token ids must stay below this; None when no Embedding reads the input.
        self.vocabulary = _vocabulary(model) if self.input.dtype.kind == "i" else None
        self.outputs = tuple(
            _output_spec(name, x, self.outputs_per_timestep)
            for name, x in zip(model.output_names, model.outputs)
        )
        self._program = StepProgram(model, analysis)
        self._model = model
        self._numpy = compile_numpy(model, analysis) if execution == "auto" else None
        # Batches of at least this many sessions run through TensorFlow.
        self._tensorflow_from_batch = 0 if self._numpy is None else 1 << 62

    @functools.cached_property
    def weights_digest(self) -> str:
        """SHA-256 over the weights: tells a retrained model from the same one."""
        digest = hashlib.sha256()
        for weight in self._model.weights:
            value = np.ascontiguousarray(weight.numpy())
            digest.update(f"{weight.path}:{value.dtype}:{value.shape};".encode())
            digest.update(value.tobytes())
        return digest.hexdigest()

    @property
    def execution(self) -> str:
        """Which path runs a step: "tensorflow", "numpy", or "numpy below N"."""
        if self._numpy is None or self._tensorflow_from_batch == 0:
            return "tensorflow"
        if self._tensorflow_from_batch >= 1 << 62:
            return "numpy"
        return f"numpy below batch {self._tensorflow_from_batch}"

    def run(self, inputs, states, has_output, on_device: bool = False):
        """One batched step: inputs [batch, time, ...], states [batch, units] each.

        Returns (outputs, states, has_output) as numpy arrays; with `on_device`,
        always through TensorFlow, and states and flags stay TensorFlow tensors
        where they were computed (on the GPU, if there is one).
        """
        if on_device:
            outputs, states, has_output = self._program.run(inputs, states, has_output)
            return [np.asarray(x) for x in outputs], states, has_output
        if len(inputs) < self._tensorflow_from_batch:
            return self._numpy.run(inputs, states, has_output)
        outputs, states, has_output = self._program.run(inputs, states, has_output)
        return (
            [np.asarray(x) for x in outputs],
            [np.asarray(x) for x in states],
            [np.asarray(x) for x in has_output],
        )

    def zero_states(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, p.units), np.float32) for p in self.state_parts]

    def choose_execution(self, large_batch: int) -> None:
        """Times both paths on one timestep, at batch 1 and at `large_batch`, and
        keeps the faster at each size. Both were checked by `self_check`."""
        if self._numpy is None:
            return
        fastest = {}
        for batch in (1, large_batch):
            x = np.zeros((batch, 1, *self.input.shape[1:]), self.input.dtype)
            has = [np.zeros(batch, bool)] * self.recurrent_layers
            args = (x, self.zero_states(batch), has)
            fastest[batch] = (
                min(
                    (_seconds_per_call(program.run, args), program)
                    for program in (self._numpy, self._program)
                )[1]
                is self._numpy
            )
        if fastest[1] and fastest[large_batch]:
            self._tensorflow_from_batch = 1 << 62
        elif fastest[1]:
            self._tensorflow_from_batch = max(2, large_batch // 4)
        else:
            self._tensorflow_from_batch = 0

    def self_check(self, seed: int = 0) -> None:
        """Streams random input in two chunks and compares with one Keras call,
        on every execution path the model may use.

        Also traces the step function, so the first request is not slow.
        """
        self._check_path(seed)
        if self._numpy is not None:
            saved, self._tensorflow_from_batch = self._tensorflow_from_batch, 0
            try:
                self._check_path(seed)
            finally:
                self._tensorflow_from_batch = saved

    def _check_path(self, seed: int) -> None:
        batch, length = _check_batch_and_length(self._model)
        cut = max(1, length // 2)
        x = _random_input(self.input, batch, length, seed)
        # Zeros, the usual mask value, at the start of both chunks: masked steps
        # there are where streaming differs most from one call.
        x[0, [0, cut]] = 0
        offline = _offline_call(self._model, x)
        has = [np.zeros(batch, bool)] * self.recurrent_layers
        first, states, has = self.run(x[:, :cut], self.zero_states(batch), has)
        second, _, _ = self.run(x[:, cut:], states, has)
        for index, (expected, a, b) in enumerate(zip(offline, first, second)):
            whole = np.concatenate([a, b], axis=1) if self.outputs_per_timestep else b
            _compare(index, whole, expected)


def try_load_model_file(
    path: Path,
    allow_unsafe: bool,
    execution: str = "auto",
    large_batch: int = 256,
    name: str | None = None,
    version: int = 1,
) -> ServedModel | None:
    """As `load_model_file`, but a refusal is logged and gives None."""
    try:
        return load_model_file(
            path, allow_unsafe, execution, large_batch, name, version
        )
    except ModelRefused as refusal:
        log.error("refused %s: %s", path, refusal)
    except Exception:  # a model we failed to foresee must not stop the others
        log.exception("refused %s: unexpected error while loading it", path)
    return None


def load_model_file(
    path: Path,
    allow_unsafe: bool,
    execution: str = "auto",
    large_batch: int = 256,
    name: str | None = None,
    version: int = 1,
) -> ServedModel:
    """Raises ModelRefused with the reason when the file cannot be served.

    The model is named after the file's stem unless `name` is given."""
    started = time.perf_counter()
    model = _read(path, allow_unsafe)
    served = ServedModel(name or path.stem, model, allow_unsafe, execution, version)
    served.self_check()
    served.choose_execution(large_batch)
    log.info(
        "loaded model %r version %d from %s in %.1f s: input %s %s, state %s, "
        "runs on %s",
        served.name,
        served.version,
        path,
        time.perf_counter() - started,
        served.input.dtype.name,
        list(served.input.shape),
        ", ".join(f"{p.layer}.{p.part}[{p.units}]" for p in served.state_parts),
        served.execution,
    )
    return served


def _read(path: Path, allow_unsafe: bool) -> keras.Model:
    try:
        # Serving needs no training configuration: custom losses and metrics
        # would otherwise stop the load.
        return keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
    except Exception as error:  # Keras raises many types for unreadable files
        text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if "unsafe" in str(error).lower() or "safe_mode" in str(error):
            names = ", ".join(repr(n) for n in _lambda_layers(path)) or "a Lambda layer"
            raise ModelRefused(
                f"layer {names} (Lambda) holds Python code; start the server with "
                "--allow-unsafe-deserialization to load it if you trust it"
            ) from None
        raise ModelRefused(f"Keras could not load the file: {text}") from None


def _lambda_layers(path: Path) -> list[str]:
    """Names of the Lambda layers in a file's stored config, without loading it."""
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as file:
                text = file.attrs["model_config"]
        else:
            with zipfile.ZipFile(path) as archive:
                text = archive.read("config.json")
        config = json.loads(text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []  # the names only improve the message
    names = []

    def visit(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                names.append(str(node.get("config", {}).get("name", "?")))
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                visit(child)

    visit(config)
    return names


def _vocabulary(model: keras.Model) -> int | None:
    sizes = [
        layer.input_dim
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.Embedding)
    ]
    return min(sizes) if sizes else None


def _input_spec(model: keras.Model) -> TensorSpec:
    tensor = model.inputs[0]
    if tensor.dtype not in INPUT_DTYPES:
        raise ModelRefused(
            f"expected an input dtype in {INPUT_DTYPES}, received {tensor.dtype}"
        )
    shape = (-1, *(_known(d, tensor) for d in tensor.shape[2:]))
    return TensorSpec(tensor.name, np.dtype(tensor.dtype), shape)


def _output_spec(name: str, tensor, per_timestep: bool) -> TensorSpec:
    feature_axes = tensor.shape[2:] if per_timestep else tensor.shape[1:]
    shape = (-1,) * per_timestep + tuple(_known(d, tensor) for d in feature_axes)
    return TensorSpec(name, np.dtype(tensor.dtype), shape)


def _known(size, tensor) -> int:
    if size is None:
        raise ModelRefused(
            f"expected every axis after time to have a fixed size, received "
            f"{tuple(tensor.shape)} for {tensor.name!r}"
        )
    return int(size)


def _check_batch_and_length(model: keras.Model) -> tuple[int, int]:
    batch, length = model.inputs[0].shape[:2]
    return batch or 2, length or 12


def _random_input(spec: TensorSpec, batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (batch, length, *spec.shape[1:])
    if spec.dtype.kind == "i":
        # Tokens 0 and 1 are valid for any Embedding, and 0 exercises the mask.
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def _seconds_per_call(function, args, calls: int = 20) -> float:
    function(*args)  # the first call may trace
    started = time.perf_counter()
    for _ in range(calls):
        function(*args)
    return (time.perf_counter() - started) / calls


def _compare(index: int, streamed: np.ndarray, expected: np.ndarray) -> None:
    if streamed.shape != expected.shape:
        raise ModelRefused(
            f"streamed output {index} has shape {streamed.shape} where one Keras "
            f"call on the whole sequence gives {expected.shape}; the model does "
            "not stream"
        )
    error = float(np.max(np.abs(streamed - expected), initial=0.0))
    if not error <= SELF_CHECK_TOLERANCE:
        raise ModelRefused(
            f"streamed output {index} differs from one Keras call on the whole "
            f"sequence by {error:.3g} (tolerance {SELF_CHECK_TOLERANCE}); the "
            "model does not stream exactly"
        )


def _offline_call(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    layers = model._flatten_layers()
    stateful = [layer for layer in layers if getattr(layer, "stateful", False)]
    for layer in stateful:
        layer.reset_state()
    outputs = model(x, training=False)
    for layer in stateful:
        layer.reset_state()
    return [np.asarray(y) for y in keras.tree.flatten(outputs)]
