"""One measured cell of the results table, and how its figures are computed."""

import dataclasses

import numpy as np


@dataclasses.dataclass(kw_only=True)
class Cell:
    """Figures of one way of stepping `sessions` sessions, one timestep each.

    `steps_per_s` counts session-steps (one session advanced by one timestep)
    completed in the measurement window. Latencies are per call or message.
    CPU figures are process CPU seconds per wall second (1.0 is one core).
    """

    kind: str  # naive, compute, echo or seqserve
    style: str  # in-process, unary, stream or many
    sessions: int
    model: str = ""  # lstm or gru; empty for echo, which runs no model
    steps_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu: float | None = None  # the serving process; in process: the only one
    load_cpu: float | None = None  # all load generators together
    load_procs: int | None = None
    calls: int = 0
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.steps_per_s is not None


def figures(steps: int, window_s: float, latencies_s: np.ndarray) -> dict:
    """Throughput and latency percentiles of one measurement window."""
    if len(latencies_s) == 0:
        return {"steps_per_s": 0.0, "calls": 0}
    p50, p99 = np.percentile(latencies_s, [50, 99])
    return {
        "steps_per_s": steps / window_s,
        "p50_ms": float(p50) * 1e3,
        "p99_ms": float(p99) * 1e3,
        "calls": len(latencies_s),
    }
