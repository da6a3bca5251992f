"""Runs a Keras model over one chunk of timesteps with its state passed in and out.

The model's own layers do the work: the graph is replayed with Keras'
machinery, except that each recurrent layer starts from the state given for it
and hands back the state it ends in. That keeps the results equal to one
offline Keras call on the whole sequence, whatever the chunking.

One detail needs care: at a masked timestep Keras repeats the layer's previous
output, and a fresh call starts from a zero "previous output". A chunk that
starts with masked steps must instead repeat the output the session last
produced, which is the layer's `h`, unless nothing was unmasked since the state
was set, where Keras gives zeros. A per-layer flag, `has_output`, tracks that.
"""

import keras
import tensorflow as tf
from keras.src import backend, tree

from .errors import ModelRefused
from .streamability import Analysis


class StepProgram:
    """A compiled function `(inputs, states, has_output) -> (outputs, ...)`.

    All tensors are batched over sessions: inputs [batch, time, ...], each
    state part [batch, units], each has_output flag [batch]. One trace serves
    every batch size and chunk length.
    """

    def __init__(self, model: keras.Model, analysis: Analysis):
        self.model = model
        self.analysis = analysis
        self._index = {id(r.layer): i for i, r in enumerate(analysis.recurrent)}
        self._offsets = []
        offset = 0
        for recurrent in analysis.recurrent:
            self._offsets.append(offset)
            offset += len(recurrent.parts)
            recurrent.layer.unroll = False  # streaming needs any chunk length
        input_shape = (None, None, *model.inputs[0].shape[2:])
        signature = [
            tf.TensorSpec(input_shape, model.inputs[0].dtype),
            [
                tf.TensorSpec([None, r.units], "float32")
                for r in analysis.recurrent
                for _ in r.parts
            ],
            [tf.TensorSpec([None], tf.bool) for _ in analysis.recurrent],
        ]
        self.run = tf.function(self._trace, input_signature=signature)

    def _trace(self, inputs, states, has_output):
        trace = _Trace(self, list(states), list(has_output))
        outputs = trace.run_model(self.model, [inputs])
        return outputs, trace.states, trace.has_output


class _Trace:
    """The state flowing through one traced call of the model."""

    def __init__(self, program: StepProgram, states: list, has_output: list):
        self.program = program
        self.states = states
        self.has_output = has_output

    def run_model(self, model: keras.Model, inputs: list):
        graph = model._functional if isinstance(model, keras.Sequential) else model
        if graph is None:
            x = inputs[0]
            for layer in model.layers:
                x = self.call(layer, x)
            return [x]
        return tree.flatten(graph._run_through_graph(inputs, call_fn=self.call))

    def call(self, operation, *args, **kwargs):
        index = self.program._index.get(id(operation))
        if index is not None:
            return self.recurrent(index, operation, *args, **kwargs)
        if isinstance(operation, keras.layers.TimeDistributed):
            return _time_distributed(operation, *args, **kwargs)
        if isinstance(operation, keras.Model) and _needs_replay(operation):
            outputs = self.run_model(operation, list(args))
            return outputs[0] if len(outputs) == 1 else outputs
        return operation(*args, **kwargs)

    def recurrent(
        self, index, layer, sequences, mask=None, initial_state=None, training=None
    ):
        if initial_state is not None:
            raise ModelRefused(
                f"layer {layer.name!r} ({type(layer).__name__}) takes its initial "
                "state from inside the model; seqserve sets it from the session"
            )
        if mask is None:
            mask = backend.get_keras_mask(sequences)
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        first = self.program._offsets[index]
        parts = slice(first, first + len(self.program.analysis.recurrent[index].parts))
        start = self.states[parts]
        has_output = self.has_output[index]

        last, sequence, end = layer.inner_loop(sequences, start, mask, training=False)

        if mask is None:
            self.has_output[index] = tf.ones_like(has_output)
        else:
            last, sequence = _continue_masked_output(
                layer, mask, has_output, start[0], last, sequence
            )
            self.has_output[index] = has_output | tf.reduce_any(mask, axis=1)
        self.states[parts] = list(end)

        output = sequence if layer.return_sequences else last
        if layer.return_sequences and mask is not None:
            backend.set_keras_mask(output, mask)
        return (output, *end) if layer.return_state else output


def _continue_masked_output(layer, mask, has_output, h, last, sequence):
    """Masked steps before the chunk's first unmasked one repeat the last output."""
    if layer.zero_output_for_mask:
        return last, sequence
    previous = tf.where(has_output[:, None], h, tf.zeros_like(h))
    if layer.return_sequences:
        seen = tf.cumsum(tf.cast(mask, tf.int32), axis=1) > 0
        sequence = tf.where(seen[:, :, None], sequence, previous[:, None, :])
    last = tf.where(tf.reduce_any(mask, axis=1)[:, None], last, previous)
    return last, sequence


def _time_distributed(wrapper, inputs, mask=None, training=None):
    """Applies the wrapped layer to every frame by folding time into the batch.

    Keras' own TimeDistributed loops over the batch size instead of the time
    axis when the time axis is unknown at trace time (Keras 3.15), so it cannot
    be traced for any chunk length.
    """
    if mask is None:
        mask = backend.get_keras_mask(inputs)
    shape = tf.shape(inputs)
    frames = tf.reshape(inputs, tf.concat([[-1], shape[2:]], axis=0))
    outputs = wrapper.layer(frames)
    out_shape = tf.shape(outputs)
    outputs = tf.reshape(outputs, tf.concat([shape[:2], out_shape[1:]], axis=0))
    if mask is not None:
        backend.set_keras_mask(outputs, mask)
    return outputs


def _needs_replay(model: keras.Model) -> bool:
    """Whether a nested model holds a layer that Keras' own call would get wrong."""
    special = (keras.layers.RNN, keras.layers.TimeDistributed)
    return any(isinstance(layer, special) for layer in model._flatten_layers())
