"""Train a streamable activity classifier on BasicMotions and save it as .keras.

The saved model is imu [batch, time, 6] -> Normalization -> LSTM(32) -> activity
softmax over the four classes, so a server can feed it one sample at a time. It is
trained on every prefix of shifted windows, so early predictions are usable too.

    python examples/basic_motions/train.py [--out PATH] [--epochs N]
"""

import argparse
from pathlib import Path

import keras
import numpy as np

from dataset import load_ts

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
SEED = 0
UNITS = 32
CHANNELS = 6
WINDOW = 70
STRIDE = 5


def build(
    norm: keras.layers.Normalization,
    n_classes: int,
    return_sequences: bool,
    dropout: float = 0.0,
) -> keras.Model:
    imu = keras.Input(shape=(None, CHANNELS), name="imu")
    lstm = keras.layers.LSTM(
        UNITS, return_sequences=return_sequences, dropout=dropout, name="lstm"
    )
    out = keras.layers.Dense(n_classes, activation="softmax", name="activity")
    return keras.Model(imu, out(lstm(norm(imu))))


def load(
    split: str, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, labels, names = load_ts(DATA / f"BasicMotions_{split}.ts")
    classes = classes or names
    return x, np.array([classes.index(label) for label in labels]), classes


def windows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A live stream may start mid-activity, and 40 whole recordings overfit fast,
    # so train on windows starting every STRIDE steps instead.
    starts = range(0, x.shape[1] - WINDOW + 1, STRIDE)
    xw = np.concatenate([x[:, s : s + WINDOW] for s in starts])
    return xw, np.tile(y, len(starts))


def train(x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int) -> keras.Model:
    # A per-step loss on a sequence model trains every prefix at once; the weights
    # then go into the same stack with return_sequences=False for serving.
    norm = keras.layers.Normalization(axis=-1, name="normalization")
    seq = build(norm, n_classes, return_sequences=True, dropout=0.2)
    norm.adapt(x)
    xw, yw = windows(x, y)
    # Early steps carry little evidence, so they count less than late ones.
    weights = np.tile(np.linspace(0.1, 1.0, WINDOW), (len(xw), 1))
    labels = np.repeat(yw[:, None], WINDOW, axis=1)
    seq.compile(
        optimizer=keras.optimizers.Adam(0.005), loss="sparse_categorical_crossentropy"
    )
    seq.fit(xw, labels, sample_weight=weights, epochs=epochs, batch_size=16, verbose=0)
    # The adapted Normalization is shared; set_weights on it would skip the step that
    # turns its variables into the mean and variance it applies.
    model = build(norm, n_classes, return_sequences=False)
    for name in ("lstm", "activity"):
        model.get_layer(name).set_weights(seq.get_layer(name).get_weights())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/basic_motions.keras"))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    keras.utils.set_random_seed(SEED)
    x_train, y_train, classes = load("TRAIN")
    x_test, y_test, _ = load("TEST", classes)
    model = train(x_train, y_train, len(classes), args.epochs)

    hits = int((model.predict(x_test, verbose=0).argmax(-1) == y_test).sum())
    print(f"classes: {' '.join(classes)}")
    print(f"test accuracy: {hits / len(y_test):.3f} ({hits}/{len(y_test)})")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
