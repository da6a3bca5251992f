"""Python client for seqserve: `from seqserve.client import Client`."""

from .client import Client, ModelInfo, Session, State, StatePartInfo, TensorInfo
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SeqServeError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "SeqServeError",
    "Session",
    "State",
    "StatePartInfo",
    "TensorInfo",
    "UnavailableError",
]
