"""Log setup for the command line, and the session id on lines about a session.

A line that concerns one session carries it as `extra=about(session)`: text
lines end with `[session ID]`, JSON lines have `session_id` and `model` keys.
"""

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "{asctime}{levelname}{name}{message}"


def about(session) -> dict[str, str]:
    """The `extra` of a log line about `session`."""
    return {"session_id": session.id, "model": session.model}


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        session_id = getattr(record, "session_id", None)
        return line if session_id is None else f"{line} [session {session_id}]"


def handler(log_format: str, stream: TextIO = sys.stderr) -> logging.Handler:
    """A handler writing `text` lines or `json` lines (one object per line)."""
    target = logging.StreamHandler(stream)
    if log_format == "json":
        target.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
            )
        )
    else:
        target.setFormatter(_TextFormatter(TEXT_FORMAT))
    return target


def configure(level: str, log_format: str) -> None:
    """Sends every log line to stderr; call once, at start, from the command line."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(log_format))
    root.setLevel(level)
