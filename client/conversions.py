"""Conversions between numpy values and the API's messages, for the client."""

from collections.abc import Mapping

import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from . import tensors

State = dict[str, dict[str, np.ndarray]]
Outputs = np.ndarray | tuple[np.ndarray, ...]


def outputs_of(messages) -> Outputs:
    outputs = tuple(tensors.to_numpy(t) for t in messages)
    return outputs[0] if len(outputs) == 1 else outputs


def cast(array, dtype: np.dtype) -> np.ndarray:
    """Casts within a kind (float64 to float32, say); the server checks the rest.

    Integers stay integers and floats floats. A value that does not survive
    the cast (an integer out of range, a float64 past float32's range) is sent
    as it is, for the server to refuse, rather than turned into another value.
    """
    array = np.asarray(array)
    if array.dtype == dtype or array.dtype.kind != dtype.kind:
        return array
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    if dtype.kind == "i" and not np.array_equal(cast, array):
        return array
    if dtype.kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(array)):
        return array
    return cast


def state_to_proto(state: Mapping[str, Mapping[str, np.ndarray]]) -> pb.State:
    return pb.State(
        parts=[
            pb.StatePart(
                layer=layer,
                part=part,
                value=tensors.to_proto(cast(value, np.dtype(np.float32))),
            )
            for layer, parts in state.items()
            for part, value in parts.items()
        ]
    )


def state_from_proto(state: pb.State) -> State:
    result: State = {}
    for part in state.parts:
        result.setdefault(part.layer, {})[part.part] = tensors.to_numpy(part.value)
    return result
