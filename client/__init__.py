"""Python client for seqserve: `from seqserve.client import Client`."""

from .client import Client, ModelInfo, StatePartInfo, TensorInfo
from .conversions import State
from .errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SeqServeError,
    StepOutOfOrderError,
    StepSkippedError,
    UnauthenticatedError,
    UnavailableError,
)
from .retries import NO_RETRIES, RetryPolicy
from .session import Session

__all__ = [
    "NO_RETRIES",
    "AlreadyExistsError",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SeqServeError",
    "Session",
    "State",
    "StatePartInfo",
    "StepOutOfOrderError",
    "StepSkippedError",
    "TensorInfo",
    "UnauthenticatedError",
    "UnavailableError",
]
