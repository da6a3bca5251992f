"""Session states kept in TensorFlow variables: on the GPU when TensorFlow sees one.

The same rows as `StateStore`, but a batch's states are gathered, stepped and
scattered back without leaving the device; only the outputs (and a state that
a client asks for) come back to the host.
"""

import numpy as np
import tensorflow as tf

from .state_store import StateStore


def tensorflow_sees_a_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


class TensorFlowStateStore(StateStore):
    """Not thread-safe: only the model's executor thread touches a store."""

    on_device = True

    def __init__(
        self, units: tuple[int, ...], recurrent_layers: int, capacity: int = 64
    ):
        super().__init__(units, recurrent_layers, capacity)
        self._states = [tf.Variable(s, trainable=False) for s in self._states]
        self._has_output = [tf.Variable(h, trainable=False) for h in self._has_output]

    def gather(self, slots: np.ndarray):
        index = tf.constant(slots)
        return (
            [tf.gather(s, index) for s in self._states],
            [tf.gather(h, index) for h in self._has_output],
        )

    def scatter(self, slots: np.ndarray, states, has_output) -> None:
        index = tf.constant(slots[:, None])
        for store, rows in zip(self._states, states):
            store.scatter_nd_update(index, rows)
        for store, rows in zip(self._has_output, has_output):
            store.scatter_nd_update(index, rows)

    def write(self, slot: int, state: list[np.ndarray] | None) -> None:
        for index, store in enumerate(self._states):
            row = tf.zeros(store.shape[1:]) if state is None else state[index]
            store[slot].assign(row)
        for store in self._has_output:
            store[slot].assign(False)

    def read(self, slot: int) -> list[np.ndarray]:
        return [s[slot].numpy() for s in self._states]

    @staticmethod
    def where(condition, chosen, other):
        return tf.where(condition, chosen, other)

    def _grow(self) -> None:
        old = self._capacity
        self._states = [_doubled(s) for s in self._states]
        self._has_output = [_doubled(h) for h in self._has_output]
        self._capacity = 2 * old
        self._free.extend(range(2 * old - 1, old - 1, -1))


def _doubled(variable: tf.Variable) -> tf.Variable:
    grown = tf.concat([variable, tf.zeros_like(variable)], axis=0)
    return tf.Variable(grown, trainable=False)
