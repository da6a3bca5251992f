"""Builds the reference models (see `reference`) with weights from fixed seeds."""

from pathlib import Path

import keras

from .reference import FEATURES, OUTPUTS, UNITS, model_name

LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}
SEEDS = {"lstm": 1, "gru": 2}


def reference_model(kind: str) -> keras.Model:
    """[time, 32] float32 -> [time, 8]; the model seqserve serves."""
    keras.utils.set_random_seed(SEEDS[kind])
    frames = keras.Input((None, FEATURES), name="frames")
    sequence = LAYERS[kind](UNITS, return_sequences=True, name=kind)(frames)
    outputs = keras.layers.Dense(OUTPUTS, name="head")(sequence)
    return keras.Model(frames, outputs, name=model_name(kind))


def stateful_twin(kind: str, weights: list) -> keras.Model:
    """The same model as Keras runs one stream: batch 1, stateful=True."""
    frames = keras.Input(batch_shape=(1, 1, FEATURES), name="frames")
    layer = LAYERS[kind](UNITS, return_sequences=True, stateful=True, name=kind)
    outputs = keras.layers.Dense(OUTPUTS, name="head")(layer(frames))
    twin = keras.Model(frames, outputs)
    twin.set_weights(weights)
    return twin


def write_models(directory: Path, kinds: list[str]) -> dict[str, Path]:
    """Saves each reference model as `<name>.keras`; returns the paths by kind."""
    paths = {}
    for kind in kinds:
        paths[kind] = directory / f"{model_name(kind)}.keras"
        reference_model(kind).save(paths[kind])
    return paths
