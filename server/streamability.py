"""Decides whether a Keras model can stream, one chunk of timesteps at a time.

A model streams when its output at step t depends only on steps up to t. The
analysis walks the model's graph, tracking which tensors still carry the time
axis (axis 1 of the input). While a tensor has a time axis, every layer on it
must be recurrent (LSTM, GRU, SimpleRNN, running forwards) or known to work on
each timestep alone. Once a recurrent layer returns only its last output, the
time axis is gone and any layer may follow. Unknown layers are refused rather
than risk wrong outputs.
"""

import dataclasses

import keras

from .errors import ModelRefused

L = keras.layers

# Recurrent cells seqserve streams, with the names of their state parts.
CELL_PARTS = {L.LSTMCell: ("h", "c"), L.GRUCell: ("h",), L.SimpleRNNCell: ("h",)}

# Layers that see one timestep at a time whatever their configuration.
PER_TIMESTEP = (
    L.InputLayer,
    L.Dense,
    L.Embedding,
    L.Masking,
    L.TimeDistributed,
    L.Dropout,
    L.SpatialDropout1D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Rescaling,
    L.Identity,
    L.Add,
    L.Subtract,
    L.Multiply,
    L.Average,
    L.Maximum,
    L.Minimum,
)

# Layers that work per timestep only when none of their axes is the time axis.
AXIS_ATTRIBUTES = {
    L.Softmax: "axis",
    L.LayerNormalization: "axis",
    L.BatchNormalization: "axis",
    L.UnitNormalization: "axis",
    L.Normalization: "axis",
    L.Concatenate: "axis",
    L.PReLU: "shared_axes",
}

CONVOLUTIONS = (L.Conv1D, L.SeparableConv1D, L.DepthwiseConv1D, L.Conv1DTranspose)

# Layers that mix timesteps, with the reason given to the user.
MIXES_TIME = {
    L.Bidirectional: "runs a recurrent layer backwards from the end of the sequence",
    L.MaxPooling1D: "pools over time",
    L.AveragePooling1D: "pools over time",
    L.GlobalMaxPooling1D: "pools over the whole sequence",
    L.GlobalAveragePooling1D: "pools over the whole sequence",
    L.Attention: "attends over time",
    L.AdditiveAttention: "attends over time",
    L.MultiHeadAttention: "attends over time",
    L.GroupQueryAttention: "attends over time",
    L.Flatten: "flattens the time axis into features",
    L.Reshape: "reshapes across the time axis",
    L.Permute: "moves the time axis",
    L.RepeatVector: "repeats over time",
    L.Cropping1D: "crops the sequence",
    L.ZeroPadding1D: "pads the sequence",
    L.UpSampling1D: "resamples time",
}

# Bare keras.ops that a functional graph may record, for example to compute a
# mask: elementwise ones keep every timestep apart, reductions must spare axis 1.
ELEMENTWISE = frozenset(
    [
        "Equal",
        "NotEqual",
        "Greater",
        "GreaterEqual",
        "Less",
        "LessEqual",
        "LogicalAnd",
        "LogicalOr",
        "LogicalNot",
        "LogicalXor",
        "Add",
        "Subtract",
        "Multiply",
        "Divide",
        "TrueDivide",
        "Cast",
        "Where",
        "Absolute",
        "Exp",
        "Log",
        "Sqrt",
        "Square",
        "Tanh",
        "Sigmoid",
        "Relu",
        "Negative",
        "Power",
        "Maximum",
        "Minimum",
        "Clip",
        "Sign",
    ]
)
REDUCTIONS = frozenset(["Any", "All", "Sum", "Mean", "Max", "Min", "Prod"])


@dataclasses.dataclass(frozen=True)
class RecurrentLayer:
    """One recurrent layer of a model, as seqserve stores its state."""

    name: str  # qualified by enclosing models: "encoder/lstm"
    layer: keras.layers.RNN
    parts: tuple[str, ...]

    @property
    def units(self) -> int:
        return int(self.layer.cell.units)


@dataclasses.dataclass(frozen=True)
class Analysis:
    recurrent: tuple[RecurrentLayer, ...]
    outputs_per_timestep: bool


def analyse(model: keras.Model, allow_unsafe: bool) -> Analysis:
    """Raises ModelRefused, naming the layer and why, if the model cannot stream."""
    if len(model.inputs) != 1:
        raise ModelRefused(
            f"expected a model with one input, received {len(model.inputs)} inputs"
        )
    if len(model.inputs[0].shape) < 2:
        raise ModelRefused(
            "expected an input of shape (batch, time, ...), received "
            f"{tuple(model.inputs[0].shape)}"
        )
    walker = _Walker(allow_unsafe)
    outputs_have_time = walker.model(model, [True], prefix="")
    if len(set(outputs_have_time)) != 1:
        raise ModelRefused(
            "expected every output to be per timestep or every output to be per "
            "sequence, received a mix"
        )
    if not walker.recurrent:
        raise ModelRefused("expected at least one LSTM, GRU or SimpleRNN layer")
    return Analysis(tuple(walker.recurrent), outputs_have_time[0])


class _Walker:
    def __init__(self, allow_unsafe: bool):
        self.allow_unsafe = allow_unsafe
        self.recurrent: list[RecurrentLayer] = []
        self.seen: set[int] = set()

    def model(self, model: keras.Model, inputs_have_time: list[bool], prefix: str):
        """Returns, for each output of `model`, whether it has a time axis."""
        graph = model._functional if isinstance(model, keras.Sequential) else model
        if graph is None:  # a Sequential never built on an Input
            has_time = inputs_have_time[0]
            for layer in model.layers:
                has_time = _per_output(self.layer(layer, [has_time], prefix), 1)[0]
            return [has_time]
        known = {id(x): t for x, t in zip(graph.inputs, inputs_have_time)}
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if node.is_input or not node.operation:
                    continue
                has_time = [known[id(x)] for x in node.input_tensors]
                if isinstance(node.operation, keras.Layer):
                    out = self.layer(node.operation, has_time, prefix)
                else:
                    out = _check_operation(node, has_time, prefix)
                for x, t in zip(node.outputs, _per_output(out, len(node.outputs))):
                    known[id(x)] = t
        return [known[id(x)] for x in graph.outputs]

    def layer(self, layer, inputs_have_time: list[bool], prefix: str):
        """Whether the layer's outputs have a time axis: one bool for all, or a list."""
        name = prefix + layer.name
        if isinstance(layer, keras.Model):
            return self.model(layer, inputs_have_time, prefix=name + "/")
        if not any(inputs_have_time):
            return False  # after the sequence: the head sees one vector per session
        if isinstance(layer, L.RNN):
            return self._recurrent(layer, name)
        if isinstance(layer, L.Lambda):
            if not self.allow_unsafe:
                _refuse(
                    name,
                    layer,
                    "holds Python code; it loads only when unsafe "
                    "deserialization is allowed (--allow-unsafe-deserialization)",
                )
            return True  # trusted by the operator; the load-time self-check tests it
        _check_per_timestep(layer, name)
        return True

    def _recurrent(self, layer: L.RNN, name: str) -> bool:
        parts = CELL_PARTS.get(type(layer.cell))
        if parts is None:
            _refuse(
                name,
                layer,
                f"has a {type(layer.cell).__name__} cell; seqserve "
                "streams LSTM, GRU and SimpleRNN cells",
            )
        if layer.go_backwards:
            _refuse(
                name,
                layer,
                "has go_backwards=True, so its output at step t needs later steps",
            )
        if id(layer) in self.seen:
            _refuse(name, layer, "is called more than once, so its state is ambiguous")
        if layer.compute_dtype != "float32":
            _refuse(
                name,
                layer,
                f"computes in {layer.compute_dtype}; seqserve keeps float32 state",
            )
        self.seen.add(id(layer))
        self.recurrent.append(RecurrentLayer(name, layer, parts))
        # The returned states describe the end of the chunk, never a timestep.
        states = [False] * len(parts) if layer.return_state else []
        return [bool(layer.return_sequences), *states]


def _check_operation(node, inputs_have_time: list[bool], prefix: str) -> bool:
    """A bare `keras.ops` call in a functional graph, such as a mask computation."""
    operation = node.operation
    name = prefix + operation.name
    if not any(inputs_have_time):
        return False
    kind = type(operation).__name__
    if kind in REDUCTIONS:
        rank = len(node.input_tensors[0].shape)
        axes = operation.axis
        axes = [axes] if isinstance(axes, int) else list(axes or range(rank))
        if any(axis % rank in (0, 1) for axis in axes):
            _refuse(
                name,
                operation,
                f"reduces over axis {operation.axis!r}, which "
                "spans the time or batch axis",
            )
        return True
    if kind in ELEMENTWISE:
        return True
    _refuse(name, operation, "is not known to work one timestep at a time")


def _per_output(out, count: int) -> list[bool]:
    return list(out) if isinstance(out, list) else [out] * count


def _check_per_timestep(layer, name: str) -> None:
    if isinstance(layer, PER_TIMESTEP):
        return
    if isinstance(layer, L.EinsumDense):
        return _check_einsum(layer, name)
    for cls, attribute in AXIS_ATTRIBUTES.items():
        if isinstance(layer, cls):
            return _check_axes(layer, name, attribute)
    if isinstance(layer, CONVOLUTIONS):
        return _check_convolution(layer, name)
    for cls, reason in MIXES_TIME.items():
        if isinstance(layer, cls):
            _refuse(name, layer, f"{reason}, so its output at step t needs other steps")
    _refuse(name, layer, "is not known to work one timestep at a time")


def _check_axes(layer, name: str, attribute: str) -> None:
    axes = getattr(layer, attribute)
    axes = [] if axes is None else [axes] if isinstance(axes, int) else list(axes)
    rank = _input_rank(layer) if attribute != "shared_axes" else None
    for axis in axes:
        # shared_axes count from 1 without the batch axis; the others from 0 with it.
        at_time = axis == 1 if rank is None else axis % rank in (0, 1)
        if at_time:
            _refuse(
                name,
                layer,
                f"has {attribute}={getattr(layer, attribute)!r}, "
                "which spans the time or batch axis",
            )


def _check_einsum(layer, name: str) -> None:
    """Per timestep when batch and time pass through untouched by the kernel."""
    lhs, output = layer.equation.split("->")
    inputs, kernel = lhs.split(",")
    # Name the axes an ellipsis stands for, so batch and time get letters too.
    rank = _input_rank(layer)
    hidden = "0123456789"[: max(0, rank - len(inputs.replace("...", "")))]
    inputs, output = inputs.replace("...", hidden), output.replace("...", hidden)
    batch, time = inputs[:2]
    if output[:2] != batch + time or time in kernel or batch in kernel:
        _refuse(
            name,
            layer,
            f"has equation {layer.equation!r}, which does not keep "
            "the batch and time axes apart from the kernel",
        )


def _input_rank(layer) -> int:
    # A layer whose call takes a mask records it as a second input, so
    # `layer.input` is then a list (BatchNormalization after Masking).
    return len(keras.tree.flatten(layer.input)[0].shape)


def _check_convolution(layer, name: str) -> None:
    kernel = layer.kernel_size[0]
    stride = layer.strides[0]
    if kernel == 1 and stride == 1:
        return
    if layer.padding == "causal":
        _refuse(
            name,
            layer,
            f"is a causal convolution of kernel size {kernel}; it "
            "needs the previous inputs, which seqserve does not keep as state yet",
        )
    _refuse(
        name,
        layer,
        f"convolves over time (kernel size {kernel}, stride {stride}, "
        f"padding {layer.padding!r}), so its output at step t needs later steps",
    )


def _refuse(name: str, layer, reason: str):
    raise ModelRefused(f"layer {name!r} ({type(layer).__name__}) {reason}")
