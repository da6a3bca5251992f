"""The NumPy step equals Keras, and is used only for what it supports."""

import keras
import numpy as np
import pytest

from seqserve.server.fastpath import compile_numpy
from seqserve.server.streamability import analyse

L = keras.layers
FEATURES = 7


def build(body) -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, FEATURES))
    return keras.Model(inputs, body(inputs))


SUPPORTED = {
    "lstm_dense": lambda x: L.Dense(3, activation="softmax")(L.LSTM(9)(x)),
    "stacked": lambda x: L.TimeDistributed(L.Dense(2))(
        L.SimpleRNN(4, return_sequences=True, activation="relu")(
            L.GRU(6, return_sequences=True, reset_after=False)(
                L.LSTM(5, return_sequences=True)(x)
            )
        )
    ),
    "gru_reset_after": lambda x: L.Activation("tanh")(
        L.Dense(4)(L.Dropout(0.5)(L.GRU(8, return_sequences=True)(x)))
    ),
    "normalised": lambda x: L.Dense(2, activation="sigmoid")(
        L.LSTM(6, use_bias=False)(
            L.Normalization(
                mean=np.linspace(-1, 1, FEATURES), variance=np.full(FEATURES, 2.0)
            )(x)
        )
    ),
}


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_numpy_step_in_chunks_equals_one_keras_call(name):
    model = build(SUPPORTED[name])
    analysis = analyse(model, allow_unsafe=False)
    program = compile_numpy(model, analysis)
    assert program is not None
    x = np.random.default_rng(0).standard_normal((3, 30, FEATURES)).astype(np.float32)
    states = [
        np.zeros((3, r.units), np.float32) for r in analysis.recurrent for _ in r.parts
    ]
    has_output = [np.zeros(3, bool) for _ in analysis.recurrent]

    pieces = []
    for start, stop in ((0, 1), (1, 12), (12, 30)):
        outputs, states, has_output = program.run(x[:, start:stop], states, has_output)
        pieces.append(outputs[0])

    expected = np.asarray(model(x))
    streamed = (
        np.concatenate(pieces, axis=1) if analysis.outputs_per_timestep else pieces[-1]
    )
    np.testing.assert_allclose(streamed, expected, atol=1e-5)


@pytest.mark.parametrize(
    "body",
    [
        lambda x: L.LSTM(4)(L.Masking(0.0)(x)),  # masks need the TensorFlow path
        lambda x: L.LSTM(4, activation="elu")(x),
        lambda x: L.Add()([L.LSTM(4, return_sequences=True)(x), L.Dense(4)(x)]),
        lambda x: L.LSTM(4)(L.LayerNormalization()(x)),
    ],
    ids=["masking", "unsupported_activation", "branching_graph", "unsupported_layer"],
)
def test_anything_else_is_left_to_the_tensorflow_path(body):
    model = build(body)
    assert compile_numpy(model, analyse(model, allow_unsafe=False)) is None
