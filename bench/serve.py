"""A server process for the benchmark: `python -m bench.serve echo|seqserve ...`.

Prints one JSON line (port, pid, settings) once it listens, then serves until
its standard input closes.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc

from seqserve.server.config import Config

from . import echo


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("kind", choices=("echo", "seqserve"))
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--max-sessions", type=int, default=Config.max_sessions)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = Config(
        model_dir=args.model_dir or Config.model_dir,
        port=0,
        max_sessions=args.max_sessions,
        log_level="WARNING",
    )
    stop = serve_echo(config) if args.kind == "echo" else serve_seqserve(config)
    sys.stdin.read()  # until the benchmark closes our standard input
    stop()


def serve_echo(config: Config):
    """The echo servicer behind the same server settings as seqserve's App."""
    sys.setswitchinterval(50e-6)  # as App does (seqserve.server.app.SWITCH_INTERVAL_S)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=config.worker_threads),
        maximum_concurrent_rpcs=None,
        options=[("grpc.so_reuseport", 0)],  # as App (SERVER_OPTIONS)
    )
    echo.add_to_server(server)
    port = server.add_insecure_port(f"{config.host}:0")
    server.start()
    _announce(port, {"worker_threads": config.worker_threads})
    return lambda: server.stop(0).wait()


def serve_seqserve(config: Config):
    # Imported here: it imports TensorFlow, which the echo server must not pay for.
    from seqserve.server.app import App

    app = App(config)
    settings = {
        field.name: str(getattr(config, field.name))
        for field in dataclasses.fields(config)
        if field.name not in ("host", "port", "model_dir", "log_level")
    }
    _announce(app.port, settings | {"models": ", ".join(sorted(app.core.models))})
    return lambda: app.stop(grace_s=0)


def _announce(port: int, settings: dict) -> None:
    print(
        json.dumps({"port": port, "pid": os.getpid(), "settings": settings}), flush=True
    )


if __name__ == "__main__":
    main()
