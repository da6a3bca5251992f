"""Child processes of the benchmark: started with this interpreter, stderr logged.

Children talk to the benchmark in lines on their standard input and output;
their standard error goes to a log file whose tail is shown if they fail.
"""

import contextlib
import dataclasses
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


class ChildFailed(RuntimeError):
    pass


class Child:
    """A `python -m <module> ...` process in the repository root."""

    def __init__(self, module: str, args: list[str], log_path: Path):
        self.log_path = log_path
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        with open(log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_line(self, timeout_s: float) -> str:
        """The next line it prints; ChildFailed if it exits or stays silent."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.stop(0)
            raise ChildFailed(f"{self._what()} printed nothing; {self._log_tail()}")
        return line.strip()

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait(self, timeout_s: float) -> None:
        """Closes its standard input and waits; ChildFailed unless it exits with 0."""
        self.stop(timeout_s)
        if self.process.returncode != 0:
            raise ChildFailed(
                f"{self._what()} exited with {self.process.returncode}; "
                + self._log_tail()
            )

    def stop(self, timeout_s: float) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %g s; killed", self._what(), timeout_s)
            self.process.kill()
            self.process.wait()

    def _what(self) -> str:
        return " ".join(self.process.args[1:3])

    def _log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "its log ends:\n  " + "\n  ".join(lines[-15:])


@dataclasses.dataclass(frozen=True)
class Server:
    pid: int
    target: str
    settings: dict


@contextlib.contextmanager
def server(kind: str, workdir: Path, *args: str) -> Iterator[Server]:
    """A `bench.serve` process; stopped on exit."""
    child = Child("bench.serve", [kind, *args], workdir / f"server-{kind}.log")
    try:
        info = json.loads(child.read_line(timeout_s=300))
        yield Server(info["pid"], f"127.0.0.1:{info['port']}", info["settings"])
    finally:
        child.stop(timeout_s=30)


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))
