"""Typed exceptions, chosen by gRPC status code, never by message text."""

import grpc


class SeqServeError(Exception):
    """A call failed; `code` is the gRPC status and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        # For a step: the number it was sent with (0: unnumbered), else None.
        self.step_number: int | None = None


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
    """The call's deadline passed. For a numbered step that the client could not
    resolve by retrying, whether it applied is unknown: `Session.sync()` tells."""


class CancelledError(SeqServeError):
    """The call was cancelled; as for DeadlineExceededError."""


class StepOutOfOrderError(SeqServeError):
    """A numbered step was refused because the server expects another number.

    `expected_step_number` is the number the session expects next. When it is
    below the number sent (`server_behind`), the server lost steps (a restore
    from a snapshot after a crash): replay your inputs from that step on (see
    `Session.resume_from`). Otherwise the step was already applied.
    """

    def __init__(self, code: grpc.StatusCode, details: str, expected: int = 0):
        super().__init__(code, details)
        self.expected_step_number = expected

    @property
    def server_behind(self) -> bool:
        return self.step_number is not None and (
            self.expected_step_number < self.step_number
        )


class StepSkippedError(SeqServeError):
    """A numbered stream step that did not apply because an earlier step of its
    session on the same stream was refused (`FAILED_PRECONDITION`, set by the
    client: the server never sends it).

    The client did not send it (`step_number` None), or sent it before it saw
    that refusal and the server refused its number (`step_number` is the
    number sent). `expected_step_number` is the number the server expects
    next, as far as the client knows. Resync the session (`Session.sync()`,
    or `resume_from` after a restore), then send the step again.
    """

    def __init__(self, details: str, expected: int):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, details)
        self.expected_step_number = expected


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
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
EXPECTED_STEP_KEY = "seqserve-expected-step"


def from_rpc_error(error: grpc.RpcError) -> SeqServeError:
    code = error.code()
    if code == grpc.StatusCode.ABORTED:
        metadata = dict(_trailing_metadata(error))
        expected = metadata.get(EXPECTED_STEP_KEY)
        if expected is not None and expected.isdigit():
            return StepOutOfOrderError(code, error.details() or "", int(expected))
    return _BY_CODE.get(code, SeqServeError)(code, error.details() or "")


def from_code(code: int, details: str, expected_step_number: int = 0) -> SeqServeError:
    """The typed error for a status carried in a message (a stream's outcome)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    status = status or grpc.StatusCode.UNKNOWN
    if status == grpc.StatusCode.ABORTED and expected_step_number > 0:
        return StepOutOfOrderError(status, details, expected_step_number)
    return _BY_CODE.get(status, SeqServeError)(status, details)


def _trailing_metadata(error: grpc.RpcError):
    getter = getattr(error, "trailing_metadata", None)
    return (getter() if getter is not None else None) or ()
