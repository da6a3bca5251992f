"""Raw gRPC access for tests that must send what the client would never send."""

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from seqserve.client.tensors import to_numpy, to_proto
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

TIMEOUT_S = 30


@contextlib.contextmanager
def stub_for(app) -> Iterator[pb_grpc.SequenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.SequenceServiceStub(channel)


def refusal(method, request) -> grpc.RpcError:
    """Calls `method`, which must fail; returns the error for its code and details."""
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=TIMEOUT_S)
    return caught.value


def status_of(method, request) -> grpc.StatusCode:
    return refusal(method, request).code()


def tensor(array) -> pb.Tensor:
    return to_proto(np.asarray(array))


def raw_tensor(dtype: int, shape, data: bytes) -> pb.Tensor:
    """A tensor exactly as given, consistent or not."""
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def state(*parts) -> pb.State:
    """`state(("lstm", "h", value), ...)`; a value may be an array or a Tensor."""
    return pb.State(
        parts=[
            pb.StatePart(
                layer=layer,
                part=part,
                value=value if isinstance(value, pb.Tensor) else tensor(value),
            )
            for layer, part, value in parts
        ]
    )


def state_arrays(message: pb.State) -> dict[tuple[str, str], np.ndarray]:
    return {(p.layer, p.part): to_numpy(p.value) for p in message.parts}


def outputs(reply: pb.StepResponse) -> np.ndarray:
    """The single output of a one-output model."""
    (output,) = reply.outputs
    return to_numpy(output)
