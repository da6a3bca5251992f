"""Errors that carry their gRPC status code.

The core raises these; the servicer turns them into statuses in one place.
Messages follow one pattern: what was expected, what was received, what to do.
"""

import grpc


class SeqServeError(Exception):
    """Base class: an error meant for the client, with its status code.

    `trailing_metadata` carries machine-readable detail, so that clients never
    parse the message.
    """

    code = grpc.StatusCode.INTERNAL
    trailing_metadata: tuple[tuple[str, str], ...] = ()


class InvalidArgument(SeqServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SeqServeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SeqServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(SeqServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SeqServeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SeqServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SeqServeError):
    code = grpc.StatusCode.CANCELLED


class StepOutOfOrder(SeqServeError):
    """A numbered step that is neither the next one nor a repeat of the last."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, session_id: str, expected: int, received: int):
        what = "an old step number" if received < expected else "a gap"
        super().__init__(
            f"session {session_id!r}: expected step number {expected}, received "
            f"{received} ({what}); send step {expected} next, replaying from "
            "your own copy of the inputs if the server is behind"
        )
        self.expected = expected
        self.trailing_metadata = ((EXPECTED_STEP_KEY, str(expected)),)


EXPECTED_STEP_KEY = "seqserve-expected-step"


class PermissionDenied(SeqServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ModelRefused(Exception):
    """A model file that cannot be served; the message names the layer and why."""
