"""Registers a service so that a request whose bytes do not parse is refused as
INVALID_ARGUMENT, and one over --max-message-bytes as RESOURCE_EXHAUSTED naming
the flag.

gRPC itself answers such a request with INTERNAL ("Exception deserializing
request!"), which blames the server for the client's bytes: invalid UTF-8 in a
string field, a truncated or corrupt message. Its own size refusal names no
flag; it now applies only above twice the limit (security.hard_message_limit).
"""

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from .errors import InvalidArgument, ResourceExhausted

_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class UnparsedRequest:
    """Stands for a request that did not parse; `refuse` raises for it."""

    def __init__(self, message: str, size: int, error: DecodeError):
        self.message = message
        self.size = size
        self.error = error


class OversizedRequest:
    """Stands for a request over the size limit, left unparsed."""

    def __init__(self, message: str, size: int, limit: int):
        self.message = message
        self.size = size
        self.limit = limit


def refuse_unparsed(request) -> None:
    """Raises for a request that stands for one refused while parsing."""
    if isinstance(request, UnparsedRequest):
        raise InvalidArgument(
            f"request: expected a serialized {request.message}, received "
            f"{request.size} bytes that do not parse ({request.error}); send a "
            "message built from seqserve.proto"
        )
    if isinstance(request, OversizedRequest):
        raise ResourceExhausted(
            f"request: expected a {request.message} of at most {request.limit} "
            f"bytes (--max-message-bytes), received {request.size} bytes; send "
            "fewer timesteps or sessions per call, or raise --max-message-bytes"
        )


def add_to_server(
    servicer, service, server: grpc.Server, max_message_bytes: int | None = None
) -> None:
    """Registers each method of `service` (a ServiceDescriptor) on `servicer`;
    a request over `max_message_bytes` (None: no limit) is left unparsed."""
    handlers = {
        method.name: _HANDLERS[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=_parser(
                GetMessageClass(method.input_type), max_message_bytes
            ),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _parser(message_type, max_message_bytes: int | None):
    def parse(data: bytes):
        if max_message_bytes is not None and len(data) > max_message_bytes:
            name = message_type.DESCRIPTOR.full_name
            return OversizedRequest(name, len(data), max_message_bytes)
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return UnparsedRequest(message_type.DESCRIPTOR.full_name, len(data), error)

    return parse
