"""Starting and ending many sessions over gRPC, outside any measurement."""

import collections

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

IN_FLIGHT = 64  # calls at once: enough to keep a 32-thread server busy


def start_sessions(target: str, model: str, count: int) -> list[str]:
    """Starts `count` sessions from zeros on `model`; returns their ids in order."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SequenceServiceStub(channel)
        request = pb.StartSessionRequest(model=model)
        replies = _call_all(stub.StartSession, [request] * count)
    return [reply.session_id for reply in replies]


def end_sessions(target: str, session_ids: list[str]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SequenceServiceStub(channel)
        _call_all(
            stub.EndSession, [pb.EndSessionRequest(session_id=i) for i in session_ids]
        )


def _call_all(method, requests: list) -> list:
    """Replies in request order, with at most IN_FLIGHT calls outstanding."""
    replies, window = [], collections.deque()
    for request in requests:
        window.append(method.future(request))
        if len(window) >= IN_FLIGHT:
            replies.append(window.popleft().result())
    replies.extend(future.result() for future in window)
    return replies
