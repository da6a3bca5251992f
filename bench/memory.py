"""Resident memory of idle LSTM sessions against their raw state bytes."""

import dataclasses
import json
import time
from pathlib import Path

from . import procstat, sessions
from .processes import Child, server

SETTLE_S = 1.0  # lets the server finish its start-up allocations


@dataclasses.dataclass(kw_only=True)
class MemoryFigure:
    """RSS of one process before and after it holds `sessions` idle sessions."""

    sessions: int
    how: str
    rss_before: int
    rss_after: int
    peak_rss: int
    state_bytes: int  # raw state of one session
    start_s: float  # time taken to start them

    @property
    def bytes_per_session(self) -> float:
        return (self.rss_after - self.rss_before) / self.sessions


def over_rpc(
    count: int, model_dir: Path, model: str, state_bytes: int, workdir: Path
) -> MemoryFigure:
    """A seqserve server process; its sessions started by StartSession calls."""
    args = ["--model-dir", str(model_dir), "--max-sessions", str(count)]
    with server("seqserve", workdir, *args) as served:
        time.sleep(SETTLE_S)
        before = procstat.memory_bytes(served.pid)
        started = time.monotonic()
        sessions.start_sessions(served.target, model, count)
        elapsed_s = time.monotonic() - started
        after = procstat.memory_bytes(served.pid)
    return MemoryFigure(
        sessions=count,
        how="seqserve server, StartSession RPCs",
        rss_before=before["rss"],
        rss_after=after["rss"],
        peak_rss=after["peak_rss"],
        state_bytes=state_bytes,
        start_s=elapsed_s,
    )


def in_core(
    counts: tuple[int, ...], model_path: Path, state_bytes: int, workdir: Path
) -> list[MemoryFigure]:
    """One process holding a SequenceCore; its RSS as the sessions reach each count.

    Sessions come from `start_session` calls, and later counts include earlier
    ones, so one process start serves every count.
    """
    result_path = workdir / "hold-sessions.json"
    plan = {
        "model_path": str(model_path),
        "counts": list(counts),
        "result_path": str(result_path),
    }
    Child(
        "bench.hold_sessions", [json.dumps(plan)], workdir / "hold-sessions.log"
    ).wait(timeout_s=3600)
    return [
        MemoryFigure(
            sessions=result["sessions"],
            how="SequenceCore.start_session in one process, no gRPC",
            rss_before=result["before"]["rss"],
            rss_after=result["after"]["rss"],
            peak_rss=result["after"]["peak_rss"],
            state_bytes=state_bytes,
            start_s=result["start_s"],
        )
        for result in json.loads(result_path.read_text())
    ]
