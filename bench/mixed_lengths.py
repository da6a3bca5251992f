"""Steps of mixed timestep counts: one execution per length, or one padded batch?

`python -m bench.mixed_lengths` (repository root). The executor groups the steps
of a batch by their number of timesteps and runs each group as its own
execution. The alternative pads every step to the longest and masks the
padding. This times both on the reference models, in process, with one BLAS
thread as in the server. The padded figure leaves out the masking itself, so
it is a lower bound for that alternative: where grouping beats it, grouping
wins.
"""

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import threadpoolctl

from seqserve.server.models import ServedModel, load_model_file

from .models import write_models
from .reference import FEATURES

BATCHES = (16, 256)
LONGEST = (2, 4, 8)


def main() -> None:
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        paths = write_models(Path(tempfile.mkdtemp()), ["lstm", "gru"])
        for kind, path in paths.items():
            served = load_model_file(path, False)
            for batch in BATCHES:
                for longest in LONGEST:
                    lengths = np.arange(batch) % longest + 1  # evenly mixed
                    groups = [
                        _step(served, int((lengths == t).sum()), t)
                        for t in range(1, longest + 1)
                    ]
                    grouped = _best_ms(_in_turn(groups))
                    padded = _best_ms(_step(served, batch, longest))
                    print(
                        f"{kind} batch {batch:4d}, lengths 1..{longest}: grouped "
                        f"{grouped:5.2f} ms, one padded batch {padded:5.2f} ms "
                        f"(padded / grouped {padded / grouped:.2f})"
                    )


def _step(served: ServedModel, batch: int, timesteps: int) -> Callable[[], object]:
    inputs = np.zeros((batch, timesteps, FEATURES), np.float32)
    states = served.zero_states(batch)
    has_output = [np.ones(batch, bool)] * served.recurrent_layers
    return lambda: served.run(inputs, states, has_output)


def _in_turn(runs: list[Callable[[], object]]) -> Callable[[], None]:
    def run_all() -> None:
        for run in runs:
            run()

    return run_all


def _best_ms(run: Callable[[], object], repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


if __name__ == "__main__":
    main()
