"""The results as Markdown: side-by-side tables, ratios and memory."""

import datetime
import importlib.metadata
import platform
import subprocess

from . import procstat
from .cells import Cell
from .memory import MemoryFigure
from .notes import notes
from .reference import model_name

PACKAGES = ("tensorflow", "keras", "grpcio", "protobuf", "numpy")
KIND_ORDER = {"naive": 0, "compute": 1, "echo": 2, "seqserve": 3}
STYLE_ORDER = {"in-process": 0, "unary": 1, "stream": 2, "many": 3}
LOAD_BOUND_CPU = 0.9  # per load generator; above it the load side may be the limit

RATIO_INTRO = (
    "Each seqserve figure divided by the naive baseline (same model and sessions), "
    "the echo server (same sessions and RPC style) and the compute ceiling (same "
    "model, batch = sessions). Above 1 is more throughput, or longer latency."
)
MEMORY_INTRO = (
    "Per session: (RSS after - RSS before) / sessions, so everything kept per "
    "session (registry entry, state row, spare capacity), against the raw float32 "
    "state (h and c: 2 x 128 x 4 bytes). Peak RSS is the process's high-water mark."
)


def document(command, settings, cells, figures, config, elapsed_s, repo_root) -> str:
    """The whole results file; `config` is the seqserve server's settings."""
    lines = ["# seqserve benchmark", "", f"- Command: `{command}` (repository root)"]
    lines += environment(repo_root)
    if config:
        values = ", ".join(f"{name}={value}" for name, value in config.items())
        lines.append(f"- seqserve server: {values}")
    lines.append(
        f"- Each cell: {settings.warmup_s:g} s warm-up, then {settings.measure_s:g} "
        f"s measured; whole run {elapsed_s / 60:.1f} min"
    )
    for kind in settings.models:
        lines += ["", f"## {model_name(kind)}: every way of stepping, side by side"]
        lines += ["", *figures_table(cells, kind)]
    lines += ["", "## seqserve against the baselines", "", RATIO_INTRO, ""]
    lines += ratio_table(cells)
    if figures:
        lines += ["", "## Memory of idle sessions (lstm128)", "", MEMORY_INTRO, ""]
        lines += memory_table(figures)
    lines += ["", "## How it was measured", "", *notes(settings, cells)]
    return "\n".join(lines) + "\n"


def environment(repo_root: str) -> list[str]:
    """Header lines: machine, software versions, the source revision and the date."""
    machine = procstat.machine()
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in PACKAGES)
    now = datetime.datetime.now().astimezone()
    cpus = f"{machine['nproc']} CPUs (nproc), {machine['cpu']}"
    return [
        f"- Date: {now:%Y-%m-%d %H:%M %Z}",
        f"- Machine: {cpus}, {machine['memory']} memory, no GPU used",
        f"- Python {platform.python_version()}; {versions}",
        f"- seqserve: {_revision(repo_root)}",
    ]


def figures_table(cells: list[Cell], kind: str) -> list[str]:
    """Every cell of one model, with the echo cells, side by side by session count."""
    rows = [c for c in cells if c.model in (kind, "")]
    rows.sort(key=lambda c: (c.sessions, KIND_ORDER[c.kind], STYLE_ORDER[c.style]))
    return _table(
        ["sessions>", "measured", "RPC", "load procs>", "session-steps/s>",
         "p50 ms>", "p99 ms>", "server CPU>", "load CPU>", "notes"],
        [
            [f"{c.sessions:,}", c.kind, c.style, _plain(c.load_procs),
             _rate(c.steps_per_s), _ms(c.p50_ms), _ms(c.p99_ms),
             _cpu(c.server_cpu), _cpu(c.load_cpu), _notes(c)]
            for c in rows
        ],
    )  # fmt: skip


def ratio_table(cells: list[Cell]) -> list[str]:
    """Each seqserve figure divided by naive, echo (same RPC), compute (same batch)."""
    served = [c for c in cells if c.kind == "seqserve"]
    served.sort(key=lambda c: (c.model, c.sessions, STYLE_ORDER[c.style]))
    rows = []
    for c in served:
        bases = [
            _find(cells, "naive", c.model, c.sessions, "in-process"),
            _find(cells, "echo", "", c.sessions, c.style),
            _find(cells, "compute", c.model, c.sessions, "in-process"),
        ]
        rates = [_ratio(c.steps_per_s, b and b.steps_per_s) for b in bases]
        p50 = " / ".join(_ratio(c.p50_ms, b and b.p50_ms) for b in bases)
        p99 = " / ".join(_ratio(c.p99_ms, b and b.p99_ms) for b in bases)
        rows.append(
            [model_name(c.model), f"{c.sessions:,}", c.style, _rate(c.steps_per_s),
             *rates, _ms(c.p50_ms), p50, _ms(c.p99_ms), p99]
        )  # fmt: skip
    return _table(
        ["model", "sessions>", "RPC", "session-steps/s>", "÷ naive>", "÷ echo>",
         "÷ compute>", "p50 ms>", "÷ naive / echo / compute", "p99 ms>",
         "÷ naive / echo / compute"],
        rows,
    )  # fmt: skip


def memory_table(figures: list[MemoryFigure]) -> list[str]:
    return _table(
        ["idle sessions>", "how", "RSS before>", "RSS after>", "per session>",
         "raw state>", "÷ raw>", "peak RSS>", "time to start>"],
        [
            [f"{f.sessions:,}", f.how, _mib(f.rss_before), _mib(f.rss_after),
             f"{f.bytes_per_session:,.0f} B", f"{f.state_bytes:,} B",
             f"{f.bytes_per_session / f.state_bytes:.2f}", _mib(f.peak_rss),
             f"{f.start_s:.1f} s"]
            for f in figures
        ],
    )  # fmt: skip


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a column name ending in ">" is right-aligned."""
    names = [c.removesuffix(">") for c in columns]
    rules = ["---:" if c.endswith(">") else "---" for c in columns]
    return [_row(names), _row(rules), *(_row(r) for r in rows)]


def _row(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def _find(cells: list[Cell], kind: str, model: str, sessions: int, style: str):
    for c in cells:
        if (c.kind, c.model, c.sessions, c.style) == (kind, model, sessions, style):
            return c if c.measured else None
    return None


def _notes(c: Cell) -> str:
    notes = [c.note] if c.note else []
    if c.load_cpu is not None and c.load_cpu / c.load_procs >= LOAD_BOUND_CPU:
        notes.append("load generators near a full core each")
    return "; ".join(notes)


def _revision(repo_root: str) -> str:
    def git(*args: str) -> str:
        command = ["git", "-C", repo_root, *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown revision"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"git {sha}" + (" with uncommitted changes" if dirty else "")


def _ratio(value, base) -> str:
    if value is None or not base:
        return "n/a"
    ratio = value / base
    if ratio >= 100:
        return f"{ratio:,.0f}"
    return f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.2f}"


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _ms(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cpu(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _plain(value) -> str:
    return "—" if value is None else str(value)


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"
