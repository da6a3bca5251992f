"""`python -m bench`: seqserve side by side with its baselines, in one run.

For each reference model and session count it measures, one timestep per
session-step: the naive baseline (a stateful Keras model per session), the
transport ceiling (an echo server, per RPC style), the compute ceiling
(`ServedModel.run` at the session count as batch) and seqserve itself (per RPC
style); then the memory of idle sessions. See bench/README.md.
"""

import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc

from . import memory, report, rpc, sessions
from .cells import Cell
from .processes import REPO_ROOT, Child, ChildFailed, Server, server
from .reference import FEATURES, model_name, state_bytes
from .settings import Settings, parse

log = logging.getLogger("bench")
CELL_OVERHEAD_S = 3  # process start-up and session set-up, per cell, roughly


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    estimate_s = settings.cell_count() * (
        settings.warmup_s + settings.measure_s + CELL_OVERHEAD_S
    )
    log.info(
        "%d cells, about %.0f min plus memory", settings.cell_count(), estimate_s / 60
    )
    started = time.monotonic()
    config: dict[str, str] = {}  # the seqserve server's settings, once it runs
    with tempfile.TemporaryDirectory(prefix="seqserve-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "models"
        model_dir.mkdir()
        cells = in_process_cells(settings, model_dir, workdir)
        cells += rpc_cells(settings, "echo", None, workdir, {})
        cells += rpc_cells(settings, "seqserve", model_dir, workdir, config)
        figures = memory_figures(settings, model_dir, workdir)
    elapsed_s = time.monotonic() - started
    text = document(settings, cells, figures, config, elapsed_s, argv)
    print(text)
    if settings.out:
        settings.out.write_text(text)
        log.info("wrote %s", settings.out)
    return 0


def in_process_cells(settings: Settings, model_dir: Path, workdir: Path) -> list[Cell]:
    """Builds the models into `model_dir`, then measures naive and compute."""
    log.info("naive and compute, in one process: %s", ", ".join(settings.models))
    result_path = workdir / "in-process.json"
    plan = {
        "model_dir": str(model_dir),
        "models": list(settings.models),
        "sessions": list(settings.sessions),
        "warmup_s": settings.warmup_s,
        "measure_s": settings.measure_s,
        "naive_max_models": settings.naive_max_models,
        "result_path": str(result_path),
    }
    Child("bench.inprocess", [json.dumps(plan)], workdir / "in-process.log").wait(
        timeout_s=3600
    )
    cells = [Cell(**row) for row in json.loads(result_path.read_text())]
    for cell in cells:
        _log_cell(cell)
    return cells


def rpc_cells(
    settings: Settings,
    kind: str,
    model_dir: Path | None,
    workdir: Path,
    server_settings: dict[str, str],
) -> list[Cell]:
    """Every RPC style and session count against one server process.

    Echo runs no model, so it is measured once and compared with every model.
    A server that does not start leaves its rows out, with the reason logged.
    The server's settings are added to `server_settings`.
    """
    args = ["--model-dir", str(model_dir)] if model_dir else []
    models = settings.models if model_dir else ("",)
    cells = []
    try:
        with server(kind, workdir, *args) as served:
            log.info("%s server %s: %s", kind, served.target, served.settings)
            server_settings.update(served.settings)
            for model in models:
                cells += _model_cells(settings, kind, model, served, workdir)
    except (ChildFailed, grpc.RpcError) as failure:
        log.error("%s server failed: %s", kind, failure)
    return cells


def _model_cells(
    settings: Settings, kind: str, model: str, served: Server, workdir: Path
) -> list[Cell]:
    """One model's cells; its sessions are started once, before, and ended after."""
    most = max(settings.sessions)
    ids = (
        sessions.start_sessions(served.target, model_name(model), most) if model else []
    )
    cells = []
    for count in settings.sessions:
        for style in settings.styles:
            plan = rpc.CellPlan(
                kind=kind,
                model=model,
                style=style,
                sessions=count,
                session_ids=tuple(ids[:count]),
                load_procs=settings.load_procs_for(style, count),
                warmup_s=settings.warmup_s,
                measure_s=settings.measure_s,
                many_max_sessions=settings.many_max_sessions,
                features=FEATURES,
            )
            cells.append(rpc.run_cell(served, plan, workdir))
            _log_cell(cells[-1])
    sessions.end_sessions(served.target, ids)
    return cells


def memory_figures(
    settings: Settings, model_dir: Path, workdir: Path
) -> list[memory.MemoryFigure]:
    """Idle LSTM sessions: over RPC in a server, and in a bare core for many."""
    lstm_path = model_dir / f"{model_name('lstm')}.keras"
    if not lstm_path.exists():
        log.info("memory: skipped; it measures lstm128, which --models leaves out")
        return []
    lstm_only = workdir / "lstm-only"
    lstm_only.mkdir()
    shutil.copy(lstm_path, lstm_only)
    lstm, raw = model_name("lstm"), state_bytes("lstm")
    figures = []
    for count in settings.memory_rpc_sessions:
        log.info("memory: %d sessions over RPC", count)
        figures.append(memory.over_rpc(count, lstm_only, lstm, raw, workdir))
    if settings.memory_core_sessions:
        counts = settings.memory_core_sessions
        log.info("memory: %s sessions in a core, no gRPC", counts)
        figures += memory.in_core(counts, lstm_path, raw, workdir)
    return figures


def document(settings, cells, figures, config, elapsed_s: float, argv) -> str:
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench", *arguments])
    return report.document(
        command, settings, cells, figures, config, elapsed_s, str(REPO_ROOT)
    )


def _log_cell(cell: Cell) -> None:
    rate = "n/a" if cell.steps_per_s is None else f"{cell.steps_per_s:,.0f}/s"
    log.info(
        "%-8s %-4s %-10s %5d sessions: %s %s",
        cell.kind,
        cell.model,
        cell.style,
        cell.sessions,
        rate,
        cell.note,
    )


if __name__ == "__main__":
    sys.exit(main())
