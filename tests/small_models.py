"""Tiny recurrent models with fixed weights, and what Keras computes offline.

The session tests need models that load in a second, not realistic ones: an
LSTM that outputs per timestep, a GRU whose head sees only the last step, and
a GRU over an integer Embedding.
"""

import functools
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

FEATURES = 3
LSTM_UNITS = 5
GRU_UNITS = 4
VOCABULARY = 6


def lstm_model(seed: int = 0) -> keras.Model:
    """[time, 3] float32 -> [time, 2]; state lstm.h, lstm.c of 5 units."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, FEATURES), name="frames")
    sequence = keras.layers.LSTM(LSTM_UNITS, return_sequences=True, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(sequence))


def gru_model(seed: int = 1) -> keras.Model:
    """[time, 3] float32 -> [2] after the last step; state gru.h of 4 units."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, FEATURES), name="frames")
    last = keras.layers.GRU(GRU_UNITS, name="gru")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(last))


def embedding_model(seed: int = 2) -> keras.Model:
    """[time] int32 tokens below 6 -> [4] after the last step; state gru.h."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None,), dtype="int32", name="tokens")
    vectors = keras.layers.Embedding(VOCABULARY, FEATURES, name="embed")(inputs)
    return keras.Model(inputs, keras.layers.GRU(GRU_UNITS, name="gru")(vectors))


def save_models(directory: Path, models: dict[str, keras.Model]) -> Path:
    for name, model in models.items():
        model.save(directory / f"{name}.keras")
    return directory


def frames(rng: np.random.Generator, timesteps: int) -> np.ndarray:
    return rng.standard_normal((timesteps, FEATURES)).astype(np.float32)


def offline_outputs(model: keras.Model, sequence: np.ndarray) -> np.ndarray:
    """One Keras call on the whole sequence of one session, batch axis dropped."""
    return np.asarray(_traced(model)(sequence[None]))[0]


def offline_state(model: keras.Model, layer: str, sequence: np.ndarray) -> list:
    """The state ([h] or [h, c]) that `layer` ends in after the whole sequence."""
    _, *state = _state_twin(model, layer)(sequence[None])
    return [np.asarray(part)[0] for part in state]


def assert_matches_offline(model: keras.Model, sequence, streamed, state) -> None:
    """Outputs streamed in chunks and the client's state (`{"lstm": {"h", "c"}}`)
    of an LSTM session equal one Keras call on the whole sequence."""
    np.testing.assert_allclose(
        np.concatenate(streamed), offline_outputs(model, sequence), atol=1e-5
    )
    h, c = offline_state(model, "lstm", sequence)
    np.testing.assert_allclose(state["lstm"]["h"], h, atol=1e-5)
    np.testing.assert_allclose(state["lstm"]["c"], c, atol=1e-5)


# Traced once per model: eager Keras runs an RNN step by step in Python, which
# would make these references the slowest part of the tests.
@functools.cache
def _traced(model: keras.Model):
    signature = [tf.TensorSpec([1, *model.input.shape[1:]], model.input.dtype)]
    return tf.function(lambda x: model(x, training=False), input_signature=signature)


@functools.cache
def _state_twin(model: keras.Model, layer: str):
    """The model up to `layer`, then a copy of `layer` that returns its state."""
    recurrent = model.get_layer(layer)
    feeding = keras.Model(model.input, recurrent.input)
    config = recurrent.get_config() | {"return_state": True, "name": layer + "_twin"}
    twin = type(recurrent).from_config(config)
    twin.build(recurrent.input.shape)
    twin.set_weights(recurrent.get_weights())
    signature = [tf.TensorSpec([1, *model.input.shape[1:]], model.input.dtype)]
    return tf.function(
        lambda x: twin(feeding(x, training=False), training=False),
        input_signature=signature,
    )
