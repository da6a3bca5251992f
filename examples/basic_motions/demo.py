"""Streams held-out smart-watch recordings through a running seqserve, sample by sample.

Each recording of the BasicMotions test set gets its own session and is sent
one 10 Hz sample per Step, as a watch would. The demo prints the live
prediction per recording, the accuracy, and whether every streamed result
equals one offline Keras call on the whole recording.

    python examples/basic_motions/demo.py --target 127.0.0.1:50051
"""

import argparse
import concurrent.futures
import os
import sys
from pathlib import Path

import numpy as np

from seqserve.client import Client

from dataset import load_ts

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOLERANCE = 1e-5
MARKS = (10, 20, 50, 100)  # samples; the recordings are 100 samples at 10 Hz


def stream(client: Client, model: str, recording: np.ndarray) -> np.ndarray:
    """Returns the probabilities after every sample: [timesteps, classes]."""
    with client.start_session(model) as session:
        return np.stack([session.step(sample[None, :]) for sample in recording])


def largest_difference(model_path: Path, recordings, traces) -> np.ndarray:
    """Per recording, the largest difference between streamed and offline outputs.

    Offline means one Keras call on the first t samples, for t at every mark
    of the live summary: the live prediction must be exact too, not only the
    final one.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # only the offline comparison needs it

    model = keras.saving.load_model(model_path, compile=False)
    streamed = np.stack(traces)
    errors = np.zeros(len(recordings))
    for t in MARKS:
        expected = np.asarray(model(recordings[:, :t]))
        errors = np.maximum(errors, np.abs(streamed[:, t - 1] - expected).max(axis=1))
    return errors


def live_summary(trace: np.ndarray, classes: list[str]) -> str:
    """The prediction after 1, 2, 5 and 10 seconds of the 10 Hz recording."""
    return " ".join(f"{t / 10:g}s:{classes[trace[t - 1].argmax()][:4]}" for t in MARKS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", default="basic_motions")
    parser.add_argument(
        "--model-file", type=Path, default=REPO / "models/basic_motions.keras"
    )
    parser.add_argument("--data", type=Path, default=HERE / "data/BasicMotions_TEST.ts")
    parser.add_argument("--parallel", type=int, default=8, help="recordings at once")
    args = parser.parse_args()

    recordings, labels, classes = load_ts(args.data)
    with Client(args.target) as client:
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            traces = list(pool.map(lambda r: stream(client, args.model, r), recordings))

    correct = 0
    for index, (trace, label) in enumerate(zip(traces, labels)):
        predicted = classes[trace[-1].argmax()]
        correct += predicted == label
        mark = "ok" if predicted == label else "WRONG"
        print(
            f"recording {index:2d} {label:9s} live {live_summary(trace, classes)}"
            f"  final {predicted:9s} p={trace[-1].max():.2f} {mark}"
        )
    print(f"accuracy: {correct / len(labels):.3f} ({correct}/{len(labels)})")

    errors = largest_difference(args.model_file, recordings, traces)
    equal = int((errors <= TOLERANCE).sum())
    print(
        f"streamed equals offline Keras for {equal}/{len(errors)} recordings "
        f"(max abs difference {errors.max():.2e}, tolerance {TOLERANCE:g})"
    )
    return 0 if equal == len(errors) else 1


if __name__ == "__main__":
    sys.exit(main())
