"""The cost of periodic snapshots on step throughput, both ways in one run.

    python -m bench.snapshot_cost [--sessions 256] [--idle 10000] [--seconds 15]

Starts the server on the bundled model twice per round, without snapshots and
with `--snapshot-interval-s 1`, alternating for `--rounds` rounds. Each time it
starts `--idle` sessions that only sit in the snapshot, then drives
`--sessions` sessions in closed loops of one-timestep unary Steps (grpc.aio,
this process) and prints the steps per second over the last `--seconds`.
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .processes import REPO_ROOT

MODEL = "basic_motions"
FEATURES = 6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot_cost")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50093)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"off": [], "every 1 s": []}
    for _ in range(args.rounds):
        for label, flags in (
            ("off", []),
            ("every 1 s", ["--snapshot-interval-s", "1"]),
        ):
            with tempfile.TemporaryDirectory() as snapshots:
                if flags:
                    flags = [*flags, "--snapshot-dir", snapshots]
                rate, size = measure(args, flags, Path(snapshots))
            results[label].append(rate)
            print(f"{label:>10}: {rate:8.0f} steps/s  (snapshot {size} bytes)")
    off, on = (statistics.mean(results[k]) for k in ("off", "every 1 s"))
    print(
        f"mean: off {off:.0f}, every 1 s {on:.0f} steps/s ({100 * (on / off - 1):+.1f} %)"
    )


def measure(args, flags: list[str], snapshots: Path) -> tuple[float, int]:
    command = [sys.executable, "-m", "seqserve.server", "--model-dir", "models"]
    command += ["--port", str(args.port), "--log-level", "WARNING", *flags]
    server = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        return asyncio.run(drive(args)), _size(snapshots / f"{MODEL}@1.snapshot")
    finally:
        server.terminate()
        server.wait(60)


async def drive(args) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}") as channel:
        stub = pb_grpc.SequenceServiceStub(channel)
        await _ready(stub)
        start = pb.StartSessionRequest(model=MODEL)
        for _ in range(args.idle):
            await stub.StartSession(start)
        ids = [
            (await stub.StartSession(start)).session_id for _ in range(args.sessions)
        ]
        x = np.zeros((1, FEATURES), np.float32)
        tensor = pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[1, FEATURES], data=x.tobytes()
        )
        warmup_end = time.monotonic() + 3
        end = warmup_end + args.seconds
        counts = await asyncio.gather(
            *(_loop(stub, i, tensor, warmup_end, end) for i in ids)
        )
        return sum(counts) / args.seconds


async def _loop(stub, session_id, tensor, warmup_end, end) -> int:
    steps, number = 0, 0
    while (now := time.monotonic()) < end:
        number += 1
        request = pb.StepRequest(
            session_id=session_id, inputs=tensor, step_number=number
        )
        await stub.Step(request)
        steps += now >= warmup_end
    return steps


async def _ready(stub) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            await stub.ListModels(pb.ListModelsRequest(), timeout=1)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


if __name__ == "__main__":
    main()
