"""Typed exceptions, chosen by gRPC status code, never by message text."""

import grpc


class SeqServeError(Exception):
    """A call failed; `code` is the gRPC status and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(SeqServeError):
    """The request was malformed for the model; nothing changed on the server."""


class NotFoundError(SeqServeError):
    """Unknown model, or a session that is unknown, ended or expired."""


class AlreadyExistsError(SeqServeError):
    """A session with the proposed id already exists."""


class ResourceExhaustedError(SeqServeError):
    """The server is at a limit (for example its maximum number of sessions)."""


class UnavailableError(SeqServeError):
    """The server could not be reached or is shutting down."""


class DeadlineExceededError(SeqServeError):
    """The call's deadline passed; whether a step applied is unknown."""


class UnauthenticatedError(SeqServeError):
    """The call carried no token, or one the server does not know."""


class PermissionDeniedError(SeqServeError):
    """The session was started by other credentials; only they may use it."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.RpcError) -> SeqServeError:
    code = error.code()
    return _BY_CODE.get(code, SeqServeError)(code, error.details() or "")


def from_code(code: int, details: str) -> SeqServeError:
    """The typed error for a status carried in a message (a stream's outcome)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    status = status or grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(status, SeqServeError)(status, details)
