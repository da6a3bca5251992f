"""A NumPy step for plain stacks of common layers, for speed.

A traced TensorFlow call costs about a millisecond before any work, which
dominates a step of one timestep for a few sessions. For a model that is a
plain chain of the layers below, the same arithmetic in NumPy takes tens of
microseconds. `compile_numpy` returns None for anything else, and the model
runs through the TensorFlow program instead. Either way the load-time
self-check compares the result with one Keras call on the whole sequence.

Supported: InputLayer, Dense (also under TimeDistributed), Activation,
Normalization on the last axis, inference no-ops (Dropout and noise layers),
and LSTM, GRU (both `reset_after`) and SimpleRNN without masking, with
linear, relu, sigmoid, tanh or softmax activations.
"""

import keras
import numpy as np

from .streamability import Analysis

L = keras.layers
NO_OPS = (
    L.Dropout,
    L.SpatialDropout1D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
)


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warnings, float32 kept


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "softmax": _softmax,
}


def compile_numpy(model: keras.Model, analysis: Analysis):
    """A NumpyProgram for a plain chain of supported layers, else None."""
    layers = _chain(model)
    if layers is None:
        return None
    steps = []
    for layer in layers:
        step = _compile_layer(layer)
        if step is None:
            return None
        steps.append(step)
    recurrent = [s for s in steps if isinstance(s, _Recurrent)]
    if [s.layer for s in recurrent] != [r.layer for r in analysis.recurrent]:
        return None
    return NumpyProgram(steps, analysis)


class NumpyProgram:
    """Same contract as program.StepProgram.run, on NumPy arrays."""

    def __init__(self, steps: list, analysis: Analysis):
        self.steps = steps
        self.per_timestep = analysis.outputs_per_timestep

    def run(self, inputs, states, has_output):
        x = np.asarray(inputs, np.float32)
        new_states: list[np.ndarray] = []
        for step in self.steps:
            if isinstance(step, _Recurrent):
                x, end = step(x, states[len(new_states) : len(new_states) + step.parts])
                new_states.extend(end)
            else:
                x = step(x)
        return [x], new_states, [np.ones_like(h) for h in has_output]


def _chain(model: keras.Model):
    """The model's layers if each feeds only the next one, else None."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    layers = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    if len(model.operations) != len(layers) + 1:
        return None  # bare ops in the graph, such as a mask computation
    previous = model.inputs[0]
    for layer in layers:
        nodes = layer._inbound_nodes
        if len(nodes) != 1 or nodes[0].input_tensors != [previous]:
            return None
        previous = nodes[0].outputs[0]
    return layers if previous is model.outputs[0] else None


def _compile_layer(layer):
    if isinstance(layer, NO_OPS + (L.InputLayer,)):
        return lambda x: x
    if isinstance(layer, L.TimeDistributed) and isinstance(layer.layer, L.Dense):
        return _dense(layer.layer)
    if isinstance(layer, L.Dense):
        return _dense(layer)
    if isinstance(layer, L.Activation):
        return _activation(layer.activation)
    if isinstance(layer, L.Normalization):
        return _normalization(layer)
    if isinstance(layer, (L.LSTM, L.GRU, L.SimpleRNN)):
        return _recurrent(layer)
    return None


def _activation(function):
    return ACTIVATIONS.get(getattr(function, "__name__", None))


def _dense(layer):
    activation = _activation(layer.activation)
    if activation is None or layer.lora_enabled or layer.quantization_mode:
        return None
    kernel = np.asarray(layer.kernel, np.float32)
    bias = np.asarray(layer.bias, np.float32) if layer.use_bias else np.float32(0)
    return lambda x: activation(x @ kernel + bias)


def _normalization(layer):
    if layer.invert or tuple(layer.axis) not in ((-1,), (len(layer.input.shape) - 1,)):
        return None
    mean = np.asarray(layer.mean, np.float32).reshape(-1)
    scale = np.maximum(
        np.sqrt(np.asarray(layer.variance, np.float32)), keras.config.epsilon()
    )
    scale = scale.reshape(-1).astype(np.float32)
    return lambda x: (x - mean) / scale


class _Recurrent:
    """One recurrent layer: the input projection for every timestep at once,
    then the recurrence step by step."""

    parts = 1

    def __init__(self, layer, activation, recurrent_activation):
        cell = layer.cell
        self.layer = layer
        self.units = cell.units
        self.act = activation
        self.rec_act = recurrent_activation
        self.kernel = np.asarray(cell.kernel, np.float32)
        self.recurrent_kernel = np.asarray(cell.recurrent_kernel, np.float32)
        self.bias = (
            np.asarray(cell.bias, np.float32) if cell.use_bias else np.float32(0)
        )

    def __call__(self, x, states):
        states = [np.asarray(s, np.float32) for s in states]
        projected = x @ self.kernel
        outputs = []
        for t in range(x.shape[1]):
            states = self.cell_step(projected[:, t], states)
            outputs.append(states[0])
        if not self.layer.return_sequences:
            return outputs[-1], states
        if len(outputs) == 1:  # the common streaming step; stack costs more
            return outputs[0][:, None], states
        return np.stack(outputs, axis=1), states


class _SimpleRNN(_Recurrent):
    def cell_step(self, xw, states):
        return [self.act(xw + self.bias + states[0] @ self.recurrent_kernel)]


class _LSTM(_Recurrent):
    parts = 2

    def cell_step(self, xw, states):
        h, c = states
        z = xw + self.bias + h @ self.recurrent_kernel
        # Gates in Keras' order; slicing is several times cheaper than np.split.
        u = self.units
        i, f, g, o = z[:, :u], z[:, u : 2 * u], z[:, 2 * u : 3 * u], z[:, 3 * u :]
        c = self.rec_act(f) * c + self.rec_act(i) * self.act(g)
        return [self.rec_act(o) * self.act(c), c]


class _GRU(_Recurrent):
    def cell_step(self, xw, states):
        h = states[0]
        kernel, units = self.recurrent_kernel, self.units
        if self.layer.cell.reset_after:
            input_bias, recurrent_bias = self._split_bias()
            x_z, x_r, x_h = np.split(xw + input_bias, 3, axis=-1)
            r_z, r_r, r_h = np.split(h @ kernel + recurrent_bias, 3, axis=-1)
            z, r = self.rec_act(x_z + r_z), self.rec_act(x_r + r_r)
            candidate = self.act(x_h + r * r_h)
        else:
            x_z, x_r, x_h = np.split(xw + self.bias, 3, axis=-1)
            z = self.rec_act(x_z + h @ kernel[:, :units])
            r = self.rec_act(x_r + h @ kernel[:, units : 2 * units])
            candidate = self.act(x_h + (r * h) @ kernel[:, 2 * units :])
        return [z * h + (1 - z) * candidate]

    def _split_bias(self):
        if self.bias.ndim == 2:  # reset_after keeps input and recurrent biases apart
            return self.bias[0], self.bias[1]
        return self.bias, np.float32(0)


def _recurrent(layer):
    cell = layer.cell
    if layer.go_backwards or layer.zero_output_for_mask:
        return None
    activation = _activation(cell.activation)
    recurrent_activation = _activation(getattr(cell, "recurrent_activation", None))
    if activation is None:
        return None
    kinds = {L.SimpleRNN: _SimpleRNN, L.LSTM: _LSTM, L.GRU: _GRU}
    kind = kinds.get(type(layer))
    if kind is None or (kind is not _SimpleRNN and recurrent_activation is None):
        return None
    return kind(layer, activation, recurrent_activation)
