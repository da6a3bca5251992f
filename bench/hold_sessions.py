"""Resident memory of idle sessions in a core, without gRPC.

`python -m bench.hold_sessions '<json plan>'` loads one model into a
`SequenceCore`, reads this process's RSS, then starts sessions one by one with
`SequenceCore.start_session` (as the StartSession RPC would) and reads the RSS
again each time the count reaches one of the plan's counts. Used where starting
them over RPC would take too long.
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.models import load_model_file

from .procstat import memory_bytes


def main() -> None:
    plan = json.loads(sys.argv[1])
    counts = sorted(plan["counts"])
    model = load_model_file(Path(plan["model_path"]), False)
    core = SequenceCore({model.name: model}, Config(max_sessions=counts[-1]))
    gc.collect()
    before = memory_bytes(os.getpid())
    results, held, started = [], 0, time.monotonic()
    for count in counts:
        for _ in range(count - held):
            core.start_session(model.name, "", None)
        held = count
        gc.collect()
        after = memory_bytes(os.getpid())
        elapsed_s = time.monotonic() - started
        results.append(
            {"sessions": count, "before": before, "after": after, "start_s": elapsed_s}
        )
    core.close()
    Path(plan["result_path"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
