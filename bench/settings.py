"""What one benchmark run measures, from flags; `--quick` changes the defaults."""

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from .reference import KINDS

STYLES = ("unary", "stream", "many")
RESULTS_PATH = Path(__file__).with_name("RESULTS.md")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Durations are per cell; every cell warms up, then measures."""

    models: tuple[str, ...] = KINDS
    sessions: tuple[int, ...] = (1, 16, 256, 4096)
    styles: tuple[str, ...] = STYLES
    warmup_s: float = 3.0
    measure_s: float = 5.0
    naive_max_models: int = 64
    load_procs: int = 0  # 0: see `load_procs_for`
    many_max_sessions: int = 4096
    memory_rpc_sessions: tuple[int, ...] = (10_000,)
    memory_core_sessions: tuple[int, ...] = (10_000, 1_000_000)
    out: Path | None = RESULTS_PATH
    quick: bool = False

    def __post_init__(self) -> None:
        _require(set(self.models) <= set(KINDS), "--models", KINDS, self.models)
        _require(set(self.styles) <= set(STYLES), "--styles", STYLES, self.styles)
        _require(min(self.sessions) >= 1, "--sessions", "counts >= 1", self.sessions)
        _require(self.measure_s > 0, "--measure-s", "more than 0", self.measure_s)
        _require(self.warmup_s >= 0, "--warmup-s", "0 or more", self.warmup_s)
        _require(
            self.naive_max_models >= 1,
            "--naive-max-models",
            ">= 1",
            self.naive_max_models,
        )
        _require(
            self.many_max_sessions >= 1,
            "--many-max-sessions",
            ">= 1",
            self.many_max_sessions,
        )

    def load_procs_for(self, style: str, sessions: int) -> int:
        """Load generator processes for one cell.

        Automatic: one, so a StepMany tick stays one message and small counts
        keep the second core for the server; two from 256 sessions on for unary
        and stream, where one Python process would be the limit.
        """
        if self.load_procs:
            return self.load_procs
        return 2 if style != "many" and sessions >= 256 else 1

    def cell_count(self) -> int:
        in_process = 2 * len(self.models) * len(self.sessions)
        rpc = (1 + len(self.models)) * len(self.styles) * len(self.sessions)
        return in_process + rpc


QUICK = {
    "models": ("lstm",),
    "sessions": (1, 256, 4096),
    "warmup_s": 0.5,
    "measure_s": 1.5,
    "naive_max_models": 4,
    "memory_rpc_sessions": (2_000,),
    "memory_core_sessions": (10_000, 100_000),
    "out": None,
}


def parse(argv: Sequence[str] | None) -> Settings:
    """Flags given win over the `--quick` defaults, which win over the full run's."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="seqserve against a naive baseline, an echo server and the "
        "compute ceiling; writes the table to --out (full runs only by default).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: " + _describe(QUICK)
    )
    parser.add_argument("--models", type=_words, help="lstm,gru")
    parser.add_argument("--sessions", type=_counts, help="1,16,256,4096")
    parser.add_argument("--styles", type=_words, help="unary,stream,many")
    parser.add_argument("--warmup-s", type=float)
    parser.add_argument("--measure-s", type=float)
    parser.add_argument("--naive-max-models", type=int)
    parser.add_argument("--load-procs", type=int, help="0: automatic")
    parser.add_argument(
        "--many-max-sessions", type=int, help="sessions per StepMany message"
    )
    parser.add_argument("--memory-rpc-sessions", type=_counts)
    parser.add_argument("--memory-core-sessions", type=_counts)
    parser.add_argument("--out", type=Path, help="Markdown file to write")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    quick = given.get("quick", False)
    try:
        return Settings(**((QUICK if quick else {}) | given))
    except ValueError as error:
        parser.error(str(error))


def _words(text: str) -> tuple[str, ...]:
    return tuple(word for word in text.split(",") if word)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(word.replace("_", "")) for word in _words(text))


def _describe(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def _require(ok: bool, name: str, expected: object, received: object) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, received {received!r}")
