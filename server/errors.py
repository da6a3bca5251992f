"""Errors that carry their gRPC status code.

The core raises these; the servicer turns them into statuses in one place.
Messages follow one pattern: what was expected, what was received, what to do.
"""

import grpc


class SeqServeError(Exception):
    """Base class: an error meant for the client, with its status code."""

    code = grpc.StatusCode.INTERNAL


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


class PermissionDenied(SeqServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ModelRefused(Exception):
    """A model file that cannot be served; the message names the layer and why."""
