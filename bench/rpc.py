"""RPC cells: load generator processes against a server process.

The benchmark samples the CPU time of the server and of every load generator
at the start and end of the shared measurement window, from /proc.
"""

import collections
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from . import procstat
from .cells import Cell, figures
from .load import LoadPlan
from .processes import Child, ChildFailed, Server, sleep_until

log = logging.getLogger(__name__)

START_MARGIN_S = 0.2  # between `go` and t0, so every generator starts together
READY_TIMEOUT_S = 300  # starting 4,096 sessions on a loaded machine


@dataclasses.dataclass(frozen=True, kw_only=True)
class CellPlan:
    kind: str  # echo or seqserve
    model: str  # lstm or gru; empty for echo
    style: str
    sessions: int
    session_ids: tuple[str, ...]  # live sessions to step; empty for echo
    load_procs: int
    warmup_s: float
    measure_s: float
    many_max_sessions: int
    features: int


@dataclasses.dataclass(frozen=True)
class Load:
    child: Child
    result_path: Path


def run_cell(server: Server, plan: CellPlan, workdir: Path) -> Cell:
    """Starts the generators, lets them step through warm-up and window, collects.

    A generator that fails makes the cell n/a, with its log's tail logged.
    """
    cell = Cell(
        kind=plan.kind,
        style=plan.style,
        sessions=plan.sessions,
        model=plan.model,
        load_procs=plan.load_procs,
    )
    loads = [
        _start_load(server, plan, index, first, count, workdir)
        for index, (first, count) in enumerate(_shares(plan.sessions, plan.load_procs))
    ]
    try:
        return _run(cell, server, plan, loads)
    except ChildFailed as failure:
        log.warning("%s", failure)
        return dataclasses.replace(cell, note="a load generator failed (see its log)")
    finally:
        for load in loads:
            load.child.stop(timeout_s=READY_TIMEOUT_S)


def _run(cell: Cell, server: Server, plan: CellPlan, loads: list[Load]) -> Cell:
    statuses = [load.child.read_line(READY_TIMEOUT_S) for load in loads]
    refused = sorted({s.split()[-1] for s in statuses if s != "ready"})
    if refused:
        for load in loads:
            load.child.send("stop")
        _wait_all(loads)
        return dataclasses.replace(cell, note=f"server answered {', '.join(refused)}")
    cpu_s = _window_cpu_s(server, plan, [load.child for load in loads])
    _wait_all(loads)
    return _collect(cell, server, loads, cpu_s, plan.measure_s)


def _wait_all(loads: list[Load]) -> None:
    """Waits for every generator, then raises the first failure if any."""
    failures = []
    for load in loads:
        try:
            load.child.wait(timeout_s=READY_TIMEOUT_S)
        except ChildFailed as failure:
            failures.append(failure)
    if failures:
        raise failures[0]


def _start_load(
    server: Server, plan: CellPlan, index: int, first: int, count: int, workdir: Path
) -> Load:
    """A generator for sessions [first, first + count) of the cell."""
    name = f"load-{plan.kind}-{plan.model}-{plan.style}-{plan.sessions}-{index}"
    load_plan = LoadPlan(
        target=server.target,
        style=plan.style,
        session_ids=list(plan.session_ids[first : first + count]),
        sessions=count,
        warmup_s=plan.warmup_s,
        measure_s=plan.measure_s,
        many_max_sessions=plan.many_max_sessions,
        features=plan.features,
        label=f"p{index}",
        result_path=str(workdir / f"{name}.json"),
    )
    child = Child("bench.load", [], workdir / f"{name}.log")
    child.send(json.dumps(dataclasses.asdict(load_plan)))
    return Load(child, Path(load_plan.result_path))


def _window_cpu_s(server: Server, plan: CellPlan, children: list[Child]) -> dict:
    """CPU seconds each process (by pid) spent in the measurement window."""
    t0 = time.monotonic() + START_MARGIN_S
    for child in children:
        child.send(f"go {t0!r}")
    pids = [server.pid, *(child.pid for child in children)]
    sleep_until(t0 + plan.warmup_s)
    before = {pid: procstat.cpu_seconds(pid) for pid in pids}
    sleep_until(t0 + plan.warmup_s + plan.measure_s)
    return {pid: procstat.cpu_seconds(pid) - before[pid] for pid in pids}


def _collect(
    cell: Cell, server: Server, loads: list[Load], cpu_s: dict, window_s: float
) -> Cell:
    steps, latencies, failures = 0, [], collections.Counter()
    for load in loads:
        result = json.loads(load.result_path.read_text())
        steps += result["steps"]
        failures.update(result["failures"])
        latencies.append(np.load(f"{load.result_path}.npy"))
    return dataclasses.replace(
        cell,
        server_cpu=cpu_s[server.pid] / window_s,
        load_cpu=sum(cpu_s[load.child.pid] for load in loads) / window_s,
        note=", ".join(f"{n} failed: {what}" for what, n in failures.most_common()),
        **figures(steps, window_s, np.concatenate(latencies)),
    )


def _shares(sessions: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of each generator's sessions: as even as possible, none empty."""
    parts = min(parts, sessions)
    counts = [sessions // parts + (i < sessions % parts) for i in range(parts)]
    firsts = [sum(counts[:i]) for i in range(parts)]
    return list(zip(firsts, counts))
