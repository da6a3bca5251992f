"""A stand-in for ServedModel, for testing the core without TensorFlow.

Its one "recurrent layer" keeps h <- h / 2 + x_t for each timestep (x_t a single
feature, broadcast over the units) and outputs h after every timestep. Halving
makes the result depend on the order of steps, and small integers keep every
value exact in float32. It records the batches it runs and can hold the
executor inside `run` until a test lets it go.
"""

import threading

import numpy as np

from seqserve.server.models import StatePartSpec, TensorSpec

UNITS = 2
POISON = -999.0  # an input value that makes `run` fail, like a bad Embedding index


class FakeModel:
    def __init__(self, name: str = "fake"):
        self.name = name
        self.version = 1
        self.input = TensorSpec("x", np.dtype("float32"), (-1, 1))
        self.outputs = (TensorSpec("h", np.dtype("float32"), (-1, UNITS)),)
        self.outputs_per_timestep = True
        self.state_parts = (StatePartSpec("rnn", "FakeRNN", "h", UNITS),)
        self.recurrent_layers = 1
        self.batches: list[tuple[int, int]] = []  # (sessions, timesteps) per run
        self.entered = threading.Event()  # set when `run` starts
        self._gate = threading.Event()
        self._gate.set()

    def hold(self) -> None:
        """The next `run` waits inside until `release`."""
        self.entered.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def run(self, inputs, states, has_output, on_device=False):
        self.entered.set()
        assert self._gate.wait(timeout=30), "the test never released the model"
        self.batches.append(inputs.shape[:2])
        if (inputs == POISON).any():
            raise ValueError("poisoned input")
        h = states[0].copy()
        outputs = np.empty((*inputs.shape[:2], UNITS), np.float32)
        for t in range(inputs.shape[1]):
            h = h / 2 + inputs[:, t]
            outputs[:, t] = h
        return [outputs], [h], [np.ones_like(has_output[0])]


def reference(chunks, start=None) -> tuple[list[np.ndarray], np.ndarray]:
    """What one session's steps give, each chunk [timesteps, 1]: (outputs, h)."""
    h = np.zeros(UNITS, np.float32) if start is None else np.asarray(start, "f4")
    results = []
    for chunk in chunks:
        outputs = []
        for x in np.asarray(chunk, np.float32)[:, 0]:
            h = h / 2 + x
            outputs.append(h)
        results.append(np.array(outputs))
    return results, h


def chunk(*values) -> np.ndarray:
    return np.array(values, np.float32)[:, None]
