"""Python client for seqserve: `from seqserve.client import Client`."""

from .client import Client, ModelInfo, Session, State, StatePartInfo, TensorInfo
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SeqServeError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SeqServeError",
    "Session",
    "State",
    "StatePartInfo",
    "TensorInfo",
    "UnauthenticatedError",
    "UnavailableError",
]
