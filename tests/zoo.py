"""Small Keras models, built with fixed seeds, for the exactness and loading tests.

Every accepted model but those in BRANCHED is one chain of layers (nested models
included), so `keras_reference.Reference` can replay it with Keras' own layers.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

L = keras.layers

SEED = 1234
FEATURES = 3
VOCABULARY = 10
STATEFUL_BATCH = 4
FIXED_LENGTH = 50


@dataclasses.dataclass(frozen=True)
class Entry:
    build: Callable[[], keras.Model]
    suffix: str = ".keras"
    refused_layer: str = ""  # for refused models: the layer the refusal names


# Layer names are given wherever a test refers to them; Keras' automatic names
# depend on how many layers the process built before.


def stacked() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(8, return_sequences=True, name="lstm")(inputs)
    # Dropout must stay off outside training, in the loop as in the layer.
    gru = L.GRU(
        6, dropout=0.3, recurrent_dropout=0.3, return_sequences=True, name="gru"
    )
    x = gru(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x), name="stacked")


def gru_reset_after() -> keras.Model:
    return _single_rnn(L.GRU(7, reset_after=True, return_sequences=True, name="gru"))


def gru_reset_before() -> keras.Model:
    return _single_rnn(L.GRU(7, reset_after=False, return_sequences=True, name="gru"))


def simple_rnn() -> keras.Model:
    return _single_rnn(L.SimpleRNN(6, return_sequences=True, name="rnn"))


def time_distributed() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(6, return_sequences=True, name="lstm")(inputs)
    outputs = L.TimeDistributed(L.Dense(3, activation="softmax"), name="head")(x)
    return keras.Model(inputs, outputs)


def last_step() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.Masking(mask_value=0.0)(inputs)  # a masked last step repeats the output
    x = L.LSTM(6, return_sequences=True, name="lstm")(x)
    x = L.GRU(5, name="gru")(x)  # the time axis ends here
    x = L.Dense(8, activation="relu")(x)
    return keras.Model(inputs, L.Dense(2, activation="softmax")(x))


def masking() -> keras.Model:
    """The mask must survive TimeDistributed and BatchNormalization."""
    inputs = keras.Input((None, FEATURES))
    x = L.Masking(mask_value=0.0)(inputs)
    x = L.TimeDistributed(L.Dense(4))(x)
    x = L.LSTM(6, return_sequences=True, name="lstm")(x)
    x = L.BatchNormalization(axis=-1)(x)
    x = L.GRU(5, return_sequences=True, name="gru")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def embedding() -> keras.Model:
    inputs = keras.Input((None,), dtype="int32")
    x = L.Embedding(VOCABULARY, 4, mask_zero=True)(inputs)
    x = L.LSTM(6, return_sequences=True, name="lstm")(x)
    return keras.Model(inputs, L.Dense(3)(x))


def normalization() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.Dense(8)(inputs)
    x = L.LayerNormalization()(x)
    x = L.LSTM(6, return_sequences=True, name="lstm")(x)
    norm = L.BatchNormalization(axis=-1)
    x = norm(x)
    x = L.Dropout(0.5)(x)
    x = L.Activation("tanh")(x)
    x = L.GRU(5, return_sequences=True, name="gru")(x)
    model = keras.Model(inputs, L.Dense(2)(x))
    # Moving statistics away from 0 and 1, so inference mode visibly matters.
    rng = np.random.default_rng(SEED)
    gamma, beta, _, _ = norm.get_weights()
    norm.set_weights([gamma, beta, rng.normal(size=6), rng.uniform(0.5, 2.0, 6)])
    return model


def einsum() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.EinsumDense("abc,cd->abd", output_shape=(None, 4))(inputs)
    x = L.Conv1D(4, 1, padding="causal")(x)  # kernel size 1: one step at a time
    x = L.GRU(5, return_sequences=True, name="gru")(x)
    return keras.Model(inputs, L.EinsumDense("...b,bc->...c", output_shape=2)(x))


def td_frame_model() -> keras.Model:
    """Each frame is a small [4, 2] grid that a nested model encodes."""
    frame = keras.Input((4, 2))
    encoded = L.Dense(5, activation="relu")(L.Flatten()(frame))
    encoder = keras.Model(frame, encoded, name="frame_encoder")
    inputs = keras.Input((None, 4, 2))
    x = L.TimeDistributed(encoder, name="frames")(inputs)
    x = L.GRU(6, return_sequences=True, name="gru")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def nested_sequential() -> keras.Model:
    encoder = keras.Sequential(
        [
            keras.Input((None, 5)),
            L.LSTM(6, return_sequences=True, name="lstm"),
            L.Dense(4),
        ],
        name="encoder",
    )
    inputs = keras.Input((None, FEATURES))
    x = encoder(L.Dense(5)(inputs))
    x = L.GRU(5, return_sequences=True, name="gru")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def nested_time_distributed() -> keras.Model:
    """A nested model without an RNN, whose TimeDistributed sees the time axis."""
    block = keras.Sequential(
        [keras.Input((None, FEATURES)), L.TimeDistributed(L.Dense(4))], name="frames"
    )
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(5, return_sequences=True, name="lstm")(block(inputs))
    return keras.Model(inputs, L.Dense(2)(x))


def nested_functional() -> keras.Model:
    inner_in = keras.Input((None, FEATURES))
    inner_out = L.SimpleRNN(4, return_sequences=True, name="rnn")(inner_in)
    encoder = keras.Model(inner_in, L.Dense(4)(inner_out), name="encoder")
    inputs = keras.Input((None, FEATURES))
    x = encoder(L.Masking(mask_value=0.0)(inputs))  # the mask enters the encoder
    x = L.LSTM(5, return_sequences=True, name="lstm")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def fixed_length() -> keras.Model:
    """Saved with a fixed time length, which lets Keras unroll the loop."""
    inputs = keras.Input((FIXED_LENGTH, FEATURES))
    x = L.LSTM(6, return_sequences=True, unroll=True, name="lstm")(inputs)
    return keras.Model(inputs, L.Dense(2)(x))


def stateful() -> keras.Model:
    inputs = keras.Input(batch_shape=(STATEFUL_BATCH, None, FEATURES))
    x = L.LSTM(6, return_sequences=True, stateful=True, name="lstm")(inputs)
    model = keras.Model(inputs, L.Dense(2)(x))
    # Leave the layer's own state variables far from zero before saving: the
    # server must not start sessions from them.
    model(np.ones((STATEFUL_BATCH, 20, FEATURES), np.float32))
    return model


def custom_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred) ** 3)


def custom_metric(y_true, y_pred):
    return keras.ops.max(keras.ops.abs(y_true - y_pred))


def custom_compiled() -> keras.Model:
    """Compiled with functions that are not registered, so they cannot load."""
    model = _single_rnn(L.LSTM(5, return_sequences=True, name="lstm"))
    model.compile(optimizer="adam", loss=custom_loss, metrics=[custom_metric])
    return model


def legacy_h5() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(5, return_sequences=True, name="lstm")(inputs)
    x = L.SimpleRNN(4, return_sequences=True, name="rnn")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def state_head() -> keras.Model:
    """The head reads the returned state, not the sequence: one output per chunk."""
    inputs = keras.Input((None, FEATURES))
    _, h, c = L.LSTM(5, return_sequences=True, return_state=True, name="lstm")(inputs)
    x = L.Concatenate()([h, c])
    return keras.Model(inputs, L.Dense(2)(x))


def rnn_wrapper() -> keras.Model:
    """The generic RNN layer around an LSTM cell."""
    return _single_rnn(L.RNN(L.LSTMCell(5), return_sequences=True, name="rnn"))


def branches() -> keras.Model:
    """Two recurrent layers side by side on one masked input."""
    inputs = keras.Input((None, FEATURES))
    x = L.Masking(mask_value=0.0)(inputs)
    a = L.LSTM(4, return_sequences=True, name="lstm")(x)
    b = L.GRU(3, return_sequences=True, name="gru")(x)
    return keras.Model(inputs, L.Dense(2)(L.Concatenate()([a, b])))


def explicit_mask() -> keras.Model:
    """The mask computed with bare ops and passed to the layer by hand."""
    inputs = keras.Input((None, FEATURES))
    mask = keras.ops.any(keras.ops.not_equal(inputs, 0.0), axis=-1)
    x = L.GRU(5, return_sequences=True, name="gru")(inputs, mask=mask)
    return keras.Model(inputs, L.Dense(2)(x))


def with_lambda() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.Lambda(lambda t: 0.5 * t + 1.0, name="shift")(inputs)
    x = L.LSTM(5, return_sequences=True, name="lstm")(x)
    return keras.Model(inputs, L.Dense(2)(x))


# Models that cannot stream; each refusal must name `refused_layer`.


def bidirectional() -> keras.Model:
    layer = L.Bidirectional(L.LSTM(4, return_sequences=True), name="both_ways")
    return _rnn_then(layer, first=True)


def go_backwards() -> keras.Model:
    return _rnn_then(
        L.LSTM(4, go_backwards=True, return_sequences=True, name="backwards"),
        first=True,
    )


def conv_same() -> keras.Model:
    return _rnn_then(L.Conv1D(4, 3, padding="same", name="conv"), first=True)


def conv_causal() -> keras.Model:
    return _rnn_then(L.Conv1D(4, 3, padding="causal", name="conv"), first=True)


def global_pool() -> keras.Model:
    return _rnn_then(L.GlobalAveragePooling1D(name="pool"))


def max_pool() -> keras.Model:
    return _rnn_then(L.MaxPooling1D(2, name="pool"))


def self_attention() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(4, return_sequences=True, name="lstm")(inputs)
    x = L.MultiHeadAttention(num_heads=2, key_dim=2, name="attention")(x, x)
    return keras.Model(inputs, L.Dense(2)(x))


def dot_attention() -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    x = L.LSTM(4, return_sequences=True, name="lstm")(inputs)
    x = L.Attention(name="attention")([x, x])
    return keras.Model(inputs, L.Dense(2)(x))


def einsum_over_time() -> keras.Model:
    inputs = keras.Input((10, FEATURES))
    x = L.LSTM(4, return_sequences=True, name="lstm")(inputs)
    x = L.EinsumDense("abc,bcd->ad", output_shape=2, name="mix")(x)
    return keras.Model(inputs, x)


def mixed_heads() -> keras.Model:
    """One head per timestep and one on the final state: no single kind of output."""
    inputs = keras.Input((None, FEATURES))
    seq, h, _ = L.LSTM(4, return_sequences=True, return_state=True, name="lstm")(inputs)
    return keras.Model(inputs, [L.Dense(2)(seq), L.Dense(2)(h)])


def flatten() -> keras.Model:
    inputs = keras.Input((10, FEATURES))
    x = L.LSTM(4, return_sequences=True, name="lstm")(inputs)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(2)(x))


ACCEPTED = {
    "stacked": Entry(stacked),
    "gru_reset_after": Entry(gru_reset_after),
    "gru_reset_before": Entry(gru_reset_before),
    "simple_rnn": Entry(simple_rnn),
    "time_distributed": Entry(time_distributed),
    "last_step": Entry(last_step),
    "masking": Entry(masking),
    "embedding": Entry(embedding),
    "normalization": Entry(normalization),
    "einsum": Entry(einsum),
    "td_frame_model": Entry(td_frame_model),
    "nested_sequential": Entry(nested_sequential),
    "nested_functional": Entry(nested_functional),
    "nested_time_distributed": Entry(nested_time_distributed),
    "fixed_length": Entry(fixed_length),
    "stateful": Entry(stateful),
    "custom_compiled": Entry(custom_compiled),
    "legacy_h5": Entry(legacy_h5, suffix=".h5"),
    "with_lambda": Entry(with_lambda),  # served only with unsafe loading allowed
    "rnn_wrapper": Entry(rnn_wrapper),
    "state_head": Entry(state_head),
    "branches": Entry(branches),
    "explicit_mask": Entry(explicit_mask),
}

# Accepted models that are not one chain of layers.
BRANCHED = ("state_head", "branches", "explicit_mask")

REFUSED = {
    "bidirectional": Entry(bidirectional, refused_layer="both_ways"),
    "go_backwards": Entry(go_backwards, refused_layer="backwards"),
    "conv_same": Entry(conv_same, refused_layer="conv"),
    "conv_causal": Entry(conv_causal, refused_layer="conv"),
    "global_pool": Entry(global_pool, refused_layer="pool"),
    "max_pool": Entry(max_pool, refused_layer="pool"),
    "self_attention": Entry(self_attention, refused_layer="attention"),
    "dot_attention": Entry(dot_attention, refused_layer="attention"),
    "flatten": Entry(flatten, refused_layer="flat"),
    "einsum_over_time": Entry(einsum_over_time, refused_layer="mix"),
    "lambda_unsafe": Entry(with_lambda, refused_layer="shift"),  # unsafe not allowed
}

# Refused for the model as a whole, not for one of its layers.
REFUSED_WHOLE = {"mixed_heads": Entry(mixed_heads)}

ZOO = {**ACCEPTED, **REFUSED, **REFUSED_WHOLE}


def build(name: str) -> keras.Model:
    keras.utils.set_random_seed(SEED)
    return ZOO[name].build()


def save(names, directory: Path) -> dict[str, keras.Model]:
    """Builds and saves each model as `<name><suffix>`; returns the built models."""
    directory.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in names:
        models[name] = build(name)
        models[name].save(directory / (name + ZOO[name].suffix))
    return models


def _single_rnn(layer) -> keras.Model:
    inputs = keras.Input((None, FEATURES))
    return keras.Model(inputs, L.Dense(3, name="head")(layer(inputs)))


def _rnn_then(layer, first: bool = False) -> keras.Model:
    """`layer` before (first) or after an LSTM, with a Dense head."""
    inputs = keras.Input((None, FEATURES))
    lstm = L.LSTM(4, return_sequences=True, name="lstm")
    x = lstm(layer(inputs)) if first else layer(lstm(inputs))
    return keras.Model(inputs, L.Dense(2)(x))
