"""Preallocated rows of recurrent state, one row per session, for one model.

Steps gather the rows of a batch and scatter the results back in bulk, so no
state passes through per-session Python objects. Not thread-safe: only the
model's executor thread touches a store.
"""

import numpy as np


class StateStore:
    on_device = False  # the rows are host arrays
    where = staticmethod(np.where)

    def __init__(
        self, units: tuple[int, ...], recurrent_layers: int, capacity: int = 64
    ):
        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1, received {capacity}")
        self._capacity = capacity
        self._states = [np.zeros((capacity, n), np.float32) for n in units]
        # Whether each layer has produced an output since its state was set.
        self._has_output = [np.zeros(capacity, bool) for _ in range(recurrent_layers)]
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self._capacity

    def allocate(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def release(self, slot: int) -> None:
        # A bad slot here would later hand one row to two sessions; fail loudly.
        if not 0 <= slot < self._capacity:
            raise ValueError(
                f"slot: expected 0 to {self._capacity - 1}, received {slot}"
            )
        self._free.append(slot)

    def gather(self, slots: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [s[slots] for s in self._states], [h[slots] for h in self._has_output]

    def scatter(self, slots: np.ndarray, states, has_output) -> None:
        for store, rows in zip(self._states, states):
            store[slots] = rows
        for store, rows in zip(self._has_output, has_output):
            store[slots] = rows

    def write(self, slot: int, state: list[np.ndarray] | None) -> None:
        """Sets one session's state; None means zeros."""
        for index, store in enumerate(self._states):
            store[slot] = 0.0 if state is None else state[index]
        for store in self._has_output:
            store[slot] = False

    def read(self, slot: int) -> list[np.ndarray]:
        return [s[slot].copy() for s in self._states]

    def _grow(self) -> None:
        old = self._capacity
        self._capacity = 2 * old
        self._states = [_doubled(s) for s in self._states]
        self._has_output = [_doubled(h) for h in self._has_output]
        self._free.extend(range(2 * old - 1, old - 1, -1))


def _doubled(array: np.ndarray) -> np.ndarray:
    grown = np.zeros((2 * len(array), *array.shape[1:]), array.dtype)
    grown[: len(array)] = array
    return grown
