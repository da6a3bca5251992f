"""A seqserve server in a subprocess, whose memory and descriptors can be read.

The soak and overload tests need the server alone in its process: /proc then
shows its resident memory and open files, and the load generator's Python does
not share its GIL.
"""

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LISTENING = re.compile(r"listening on [^ ]+:(\d+)")
SERVING = "serving models"  # logged once every model is loaded and warmed up
START_TIMEOUT_S = 180


class ServerProcess:
    def __init__(self, process: subprocess.Popen, port: int, log: collections.deque):
        self.process = process
        self.port = port
        self.log = log  # its last lines of output, for failure messages

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = re.search(r"VmRSS:\s+(\d+) kB", status).group(1)
        return int(kilobytes) * 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def alive(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def server_process(model_dir: Path, *flags: str) -> Iterator[ServerProcess]:
    """Runs `python -m seqserve.server` on port 0 until the block ends (SIGTERM)."""
    command = [sys.executable, "-m", "seqserve.server", "--model-dir", str(model_dir)]
    command += ["--port", "0", *flags]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        command, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env
    )
    log: collections.deque = collections.deque(maxlen=50)
    try:
        port = _wait_for_port(process, log)
        threading.Thread(target=_drain, args=(process, log), daemon=True).start()
        yield ServerProcess(process, port, log)
    finally:
        _stop(process)


def _wait_for_port(process: subprocess.Popen, log: collections.deque) -> int:
    """The port, once the server serves (it listens before its models load)."""
    deadline, port = time.monotonic() + START_TIMEOUT_S, None
    for line in process.stdout:
        log.append(line.rstrip())
        if match := LISTENING.search(line):
            port = int(match.group(1))
        if SERVING in line and port is not None:
            return port
        if time.monotonic() > deadline:
            break
    raise RuntimeError("the server did not start:\n" + "\n".join(log))


def _drain(process: subprocess.Popen, log: collections.deque) -> None:
    for line in process.stdout:
        log.append(line.rstrip())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
