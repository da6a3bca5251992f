"""The "How it was measured" section: method, and what this run actually did."""

from .cells import Cell
from .reference import FEATURES

METHOD = [
    (
        "A session-step advances one session by one timestep. Every session has at "
        "most one step in flight (closed loop). Latency is per call or message, "
        "from when the client issues it to when its reply is back in the client."
    ),
    (
        "CPU is process CPU seconds (user + system, all threads, from /proc) per "
        "wall second: 1.00 is one core. In-process rows have one process."
    ),
    (
        "compute: `load_model_file(path, False).run(inputs[batch, 1, 32], states, "
        "has_output)` in one process, states fed back, batch = sessions, BLAS "
        "limited to one thread as in the server. seqserve "
        "runs at most max_batch_size sessions per call (256 by default), so larger "
        "batches are a ceiling it cannot reach with that setting."
    ),
    (
        "echo: the seqserve.v1 service with a servicer that runs no model: fresh "
        "replies around cached zero outputs, [timesteps, 8] float32 per Step and "
        "per StepStream message, [sessions, timesteps, 8] per StepMany; requests "
        "are not decoded. Same server settings as seqserve's App: sync "
        "`grpc.server`, a thread pool of worker_threads, maximum_concurrent_rpcs "
        "None, no options. "
        "It runs no model, so its rows repeat under each model."
    ),
    (
        "seqserve: the real App in its own process (`python -m bench.serve "
        "seqserve`), default Config apart from port 0, log level and max_sessions; "
        "all models loaded in one server. The sessions of each model are started "
        "once (StartSession), stepped by every cell of that model (the first n for "
        "n sessions), and ended after them."
    ),
]
CANCELLED = (
    "`failed: Step CANCELLED`: with more than about 1,000 unary calls waiting for "
    "a worker thread, gRPC core cancels the excess before the servicer sees them "
    "(server option `grpc.server.max_pending_requests`, 1000 by default; raising "
    "it removed these failures in a trial against the echo server). Throughput "
    "and latency count only calls that succeeded."
)
REFUSED = (
    "n/a: the server refused that RPC style (status in the notes), typically "
    "UNIMPLEMENTED before it is added; the cell was skipped."
)


def notes(settings, cells: list[Cell]) -> list[str]:
    """Bullet lines for the results file."""
    lines = [*METHOD, _naive(settings), _load(settings), _many_size(settings)]
    if any("CANCELLED" in c.note for c in cells):
        lines.append(CANCELLED)
    if any(c.note.startswith("server answered") for c in cells):
        lines.append(REFUSED)
    return [f"- {line}" for line in lines]


def _naive(settings) -> str:
    return (
        "naive: one Keras model with stateful=True and batch 1 per session, "
        "`predict_on_batch` round-robin, in one process. At most "
        f"{settings.naive_max_models} models are built (about 0.5 s each); more "
        "sessions step those in turn, which costs the same per step."
    )


def _load(settings) -> str:
    if settings.load_procs:
        rule = f"This run: {settings.load_procs} per cell (--load-procs)."
    else:
        rule = (
            "This run chose 1 for StepMany and below 256 sessions, else 2 (on 2 "
            "cores more would take CPU from the server)."
        )
    return (
        "Load generators: separate processes (column `load procs`), one grpc.aio "
        "channel each. unary: one task per session, Step then await the reply. "
        "stream: one StepStream per process carrying all its sessions; a session's "
        "next request is written when its reply arrives. many: one StepMany "
        f"message per process per tick, at most {settings.many_max_sessions:,} "
        f"sessions each. {rule}"
    )


def _many_size(settings) -> str:
    sessions = min(max(settings.sessions), settings.many_max_sessions)
    request_bytes = sessions * (FEATURES * 4 + 26)  # a minted id: 24 characters
    return (
        f"StepMany at {sessions:,} sessions per message: about "
        f"{request_bytes / 2**20:.2f} MiB per request (inputs and session ids), "
        "under gRPC's default 4 MiB limit, so a tick is one message per process."
    )
