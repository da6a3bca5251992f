"""The naive baseline and the compute ceiling, measured in one process, no RPC.

`python -m bench` runs this module in its own process:
`python -m bench.inprocess '<json plan>'`; the cells go to the plan's result file.
"""

import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import threadpoolctl

from seqserve.server.models import load_model_file

from .cells import Cell, figures
from .models import reference_model, stateful_twin, write_models
from .reference import FEATURES

log = logging.getLogger(__name__)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = json.loads(sys.argv[1])
    paths = write_models(Path(plan["model_dir"]), plan["models"])
    cells = []
    for kind in plan["models"]:
        cells += compute_cells(kind, paths[kind], plan)
        cells += naive_cells(kind, plan)
    rows = [dataclasses.asdict(cell) for cell in cells]
    Path(plan["result_path"]).write_text(json.dumps(rows))


def compute_cells(kind: str, path: Path, plan: dict) -> list[Cell]:
    """seqserve's batched step, `ServedModel.run`, at each session count as batch.

    The states it returns feed the next call, as the server's state store would.
    BLAS gets one thread, as in the server (see server/app.py).
    """
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        served = load_model_file(path, False)
        cells = []
        for batch in plan["sessions"]:
            cell = Cell(kind="compute", style="in-process", sessions=batch, model=kind)
            cells.append(_measure(cell, _batched_step(served, batch), batch, plan))
    return cells


def _batched_step(served, batch: int) -> Callable[[], None]:
    inputs = _frames(batch)
    states = served.zero_states(batch)
    has_output = [np.zeros(batch, bool)] * served.recurrent_layers

    def step():
        nonlocal states, has_output
        _, states, has_output = served.run(inputs, states, has_output)

    return step


def naive_cells(kind: str, plan: dict) -> list[Cell]:
    """One stateful batch-1 Keras model per session, `predict_on_batch` round-robin.

    At most `naive_max_models` models are built (each takes about half a second
    with its first call); more sessions reuse them in turn, which costs the
    same per step as long as one model's step does not depend on how many
    others exist.
    """
    weights = reference_model(kind).get_weights()
    count = min(max(plan["sessions"]), plan["naive_max_models"])
    started = time.monotonic()
    twins = [stateful_twin(kind, weights) for _ in range(count)]
    for twin in twins:
        twin.predict_on_batch(_frames(1))  # traces its step function
    elapsed_s = time.monotonic() - started
    log.info("built %d naive %s models in %.1f s", count, kind, elapsed_s)
    cells = []
    for sessions in plan["sessions"]:
        used = min(sessions, count)
        cell = Cell(kind="naive", style="in-process", sessions=sessions, model=kind)
        if used < sessions:
            cell.note = f"measured with {used} models stepped in turn"
        cells.append(_measure(cell, _round_robin(twins[:used]), 1, plan))
    return cells


def _round_robin(twins: list) -> Callable[[], None]:
    turn = itertools.cycle(twins)
    frame = _frames(1)
    return lambda: next(turn).predict_on_batch(frame)


def _measure(cell: Cell, step: Callable[[], object], steps: int, plan: dict) -> Cell:
    """Calls `step` (worth `steps` session-steps) through warm-up, then measures."""
    warm_end = time.monotonic() + plan["warmup_s"]
    while time.monotonic() < warm_end:
        step()
    latencies = []
    cpu_start, start = time.process_time(), time.monotonic()
    done, end = start, start + plan["measure_s"]
    while done < end:
        called = time.monotonic()
        step()
        done = time.monotonic()
        latencies.append(done - called)
    window_s = done - start
    cell = dataclasses.replace(
        cell,
        server_cpu=(time.process_time() - cpu_start) / window_s,
        **figures(steps * len(latencies), window_s, np.array(latencies)),
    )
    log.info("%s", cell)
    return cell


def _frames(batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    return rng.standard_normal((batch, 1, FEATURES)).astype(np.float32)


if __name__ == "__main__":
    main()
