"""Strict conversion between `seqserve.v1.Tensor` messages and numpy arrays."""

import math

import numpy as np

from seqserve.client.tensors import NUMPY_DTYPES, PROTO_DTYPES
from seqserve.client.tensors import to_proto as encode  # noqa: F401 (re-exported)
from seqserve.v1 import seqserve_pb2 as pb

from .errors import InvalidArgument

# numpy's limit on dimensions; a longer shape would also make the byte count
# below a number too long to print.
MAX_DIMENSIONS = 64


def dtype_name(code: int) -> str:
    return pb.DataType.Name(code) if code in pb.DataType.values() else f"<enum {code}>"


def proto_dtype(dtype: np.dtype) -> int:
    return PROTO_DTYPES[np.dtype(dtype).name]


def decode(tensor: pb.Tensor, what: str) -> np.ndarray:
    """Returns a read-only view of the tensor's bytes, checked for consistency.

    `what` names the field in error messages, for example "inputs".
    """
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        known = sorted(dtype_name(code) for code in NUMPY_DTYPES)
        raise InvalidArgument(
            f"{what}: expected dtype one of {known}, received {dtype_name(tensor.dtype)}"
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidArgument(
            f"{what}: expected at most {MAX_DIMENSIONS} dimensions, received "
            f"{len(shape)}"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{what}: expected a shape of sizes >= 0, received {list(shape)}"
        )
    count = math.prod(shape)  # exact: float products round for large sizes
    if count * dtype.itemsize != len(tensor.data):
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {dtype_name(tensor.dtype)} needs "
            f"{count * dtype.itemsize} bytes, received {len(tensor.data)}"
        )
    try:
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError:  # an empty shape whose other sizes overflow numpy's limit
        raise InvalidArgument(
            f"{what}: expected sizes numpy can address, received {list(shape)}"
        ) from None
