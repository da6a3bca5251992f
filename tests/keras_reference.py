"""What Keras itself computes for a model, to check the server against.

`Reference.outputs` is one call of the model on the whole sequence.
`Reference.replay` calls the model's layers in order, with each recurrent layer
swapped for a twin built from its config with `return_state=True` and given
its weights, so that a run can start from a chosen state (Keras'
`initial_state=`) and report the state it ends in. Both run under tf.function:
Keras' recurrent loops are about a hundred times slower eagerly.
"""

import keras
import numpy as np
import tensorflow as tf
from keras.src import backend

L = keras.layers


def state_parts(layer: keras.layers.RNN) -> tuple[str, ...]:
    """The order Keras keeps states in: [h, c] for an LSTM cell, [h] otherwise."""
    return ("h", "c") if isinstance(layer.cell, L.LSTMCell) else ("h",)


def chain(model: keras.Model, prefix: str = ""):
    """(qualified name, layer) in call order, descending into models with an RNN.

    Valid only for models whose layers form one chain, as in the zoo.
    """
    for layer in model.layers:
        if isinstance(layer, L.InputLayer):
            continue
        name = prefix + layer.name
        if isinstance(layer, keras.Model) and _holds_rnn(layer):
            yield from chain(layer, name + "/")
        else:
            yield name, layer


class Reference:
    """Keras' results for one session's sequence x [time, ...] (batched inside)."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.batch = model.inputs[0].shape[0] or 1  # a stateful model fixes it
        self.rnns = {n: x for n, x in chain(model) if isinstance(x, L.RNN)}
        self._twins = {name: _twin(layer) for name, layer in self.rnns.items()}
        self._cache = {}  # the tests ask for the same sequences many times
        self._call, self._replay = self._model_call, self._replay_graph
        # Compiled for any length, except where Keras' TimeDistributed is in
        # the way: traced with an unknown time axis it maps over the batch
        # instead (Keras 3.15), and a trace per length costs more than eager.
        if not any(isinstance(x, L.TimeDistributed) for x in model._flatten_layers()):
            self._call = tf.function(self._call, reduce_retracing=True)
            self._replay = tf.function(self._replay, reduce_retracing=True)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """One call of the model itself on the whole sequence."""
        key = ("outputs", _key(x))
        if key not in self._cache:
            for layer in self.rnns.values():
                if layer.stateful:
                    layer.reset_state()  # the model's own memory starts clean
            self._cache[key] = np.asarray(self._call(self._batched(x)))[0]
        return self._cache[key]

    def replay(self, x: np.ndarray, initial_state=None):
        """(outputs, state) with state as {layer: {part: [units]}}.

        `initial_state` has the same form; absent, Keras starts from zeros.
        """
        key = ("replay", _key(x), _key(initial_state))
        if key not in self._cache:
            self._cache[key] = self._run_replay(x, initial_state)
        return self._cache[key]

    def _run_replay(self, x, initial_state):
        start = None
        if initial_state is not None:
            start = {
                name: [self._batched(initial_state[name][p]) for p in state_parts(rnn)]
                for name, rnn in self.rnns.items()
            }
        outputs, states = self._replay(self._batched(x), start)
        final = {
            name: {
                p: np.asarray(s)[0] for p, s in zip(state_parts(layer), states[name])
            }
            for name, layer in self.rnns.items()
        }
        return np.asarray(outputs)[0], final

    def _batched(self, array: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(array)[None], self.batch, axis=0)

    def _model_call(self, x):
        return self.model(x, training=False)

    def _replay_graph(self, x, start):
        states = {}
        for name, layer in chain(self.model):
            if name not in self._twins:
                x = layer(x, training=False)
                continue
            initial = None if start is None else start[name]
            # Passed explicitly: with `initial_state` given, Keras 3.15 no longer
            # fills in the mask of the input and would run masked steps as data.
            mask = backend.get_keras_mask(x)
            x, *states[name] = self._twins[name](x, initial_state=initial, mask=mask)
        return x, states


def _key(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, dict):
        return b"|".join(k.encode() + b"=" + _key(v) for k, v in sorted(value.items()))
    value = np.asarray(value)
    return str(value.shape).encode() + value.tobytes()


def _twin(layer: keras.layers.RNN) -> keras.layers.RNN:
    """A stateless copy of `layer` that returns its state, with the same weights."""
    config = {**layer.get_config(), "return_state": True, "stateful": False}
    # A rolled loop: the twin must also run sequences shorter than the model's.
    config["unroll"] = False
    twin = type(layer).from_config(config)
    twin.build((None, None, layer.cell.kernel.shape[0]))
    twin.cell.set_weights(layer.cell.get_weights())
    return twin


def _holds_rnn(model: keras.Model) -> bool:
    return any(isinstance(x, L.RNN) for x in model._flatten_layers())
