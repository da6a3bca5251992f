"""Shared fixtures: real servers on port 0, in this process, and clients for them."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from seqserve.client import Client
from seqserve.server.app import App
from seqserve.server.config import Config

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(model_dir: Path, **settings) -> Iterator[App]:
    """A real gRPC server on a free port; stopped on exit."""
    app = App(Config(model_dir=Path(model_dir), port=0, **settings))
    try:
        yield app
    finally:
        app.stop(grace_s=0)


@contextlib.contextmanager
def client_for(app: App, **options) -> Iterator[Client]:
    with Client(f"127.0.0.1:{app.port}", **options) as client:
        yield client


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    return REPO / "models"
