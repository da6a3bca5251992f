"""numpy arrays to and from `seqserve.v1.Tensor`, in one call each way."""

import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
}
PROTO_DTYPES = {dtype.name: code for code, dtype in NUMPY_DTYPES.items()}


def numpy_dtype(code: int) -> np.dtype:
    return NUMPY_DTYPES[code]


def to_proto(array: np.ndarray) -> pb.Tensor:
    array = np.asarray(array)
    if array.dtype.name not in PROTO_DTYPES:
        raise TypeError(
            f"expected one of {sorted(PROTO_DTYPES)}, received {array.dtype}"
        )
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(
        dtype=PROTO_DTYPES[array.dtype.name], shape=array.shape, data=little.tobytes()
    )


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=NUMPY_DTYPES[tensor.dtype]).reshape(
        tuple(tensor.shape)
    )
