"""The transport ceiling: seqserve.v1 served by a servicer that runs no model.

Each reply carries zero outputs of the reference model's size (8 float32 per
timestep and session) in a freshly built response; requests are neither decoded
nor validated. What remains is gRPC and protobuf in Python.
"""

import math

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .reference import OUTPUTS


class EchoServicer(pb_grpc.SequenceServiceServicer):
    """Thread-safe: its only state is a cache of immutable zero tensors."""

    def __init__(self):
        self._zeros: dict[tuple[int, ...], pb.Tensor] = {}

    def StartSession(self, request, context):
        return pb.StartSessionResponse(session_id=request.session_id or "echo")

    def EndSession(self, request, context):
        return pb.EndSessionResponse()

    def Step(self, request, context):
        timesteps = _size(request.inputs, 0)
        return pb.StepResponse(
            outputs=[self._output(timesteps, OUTPUTS)], timesteps=timesteps
        )

    def StepStream(self, request_iterator, context):
        for request in request_iterator:
            yield pb.StepOutcome(response=self.Step(request, context))

    def StepMany(self, request, context):
        sessions = len(request.session_ids)
        timesteps = _size(request.inputs, 1)
        return pb.StepManyResponse(
            outputs=[self._output(sessions, timesteps, OUTPUTS)],
            timesteps=[timesteps] * sessions,
        )

    def _output(self, *shape: int) -> pb.Tensor:
        # Racing threads may both build one; either copy is right.
        zeros = self._zeros.get(shape)
        if zeros is None:
            zeros = pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=shape,
                data=bytes(4 * math.prod(shape)),
            )
            self._zeros[shape] = zeros
        return zeros


def _size(inputs: pb.Tensor, axis: int) -> int:
    return inputs.shape[axis] if len(inputs.shape) > axis else 1


def add_to_server(server: grpc.Server) -> None:
    pb_grpc.add_SequenceServiceServicer_to_server(EchoServicer(), server)
