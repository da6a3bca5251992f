"""A load generator process: grpc.aio, a closed loop for every session.

`python -m bench.load` reads its plan as one JSON line on standard input,
checks that the RPC style answers, prints `ready` (or `unavailable <code>`),
and waits for `go <t0>` on standard input, t0 on the shared monotonic clock.
It then steps until t0 + warmup_s + measure_s and records only calls that
complete in the last measure_s; calls still in flight then are cancelled.
Every session has at most one step in flight:

- unary: one task per session; Step, await the reply, Step again.
- stream: one StepStream for all of this process's sessions; a session's next
  request is written as soon as its reply arrives.
- many: StepMany with all of this process's sessions in one message (several
  of at most many_max_sessions), each message in its own loop.
"""

import asyncio
import collections
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadPlan:
    target: str
    style: str  # unary, stream or many
    session_ids: list[str]  # started by the benchmark; empty: make ids up (echo)
    sessions: int
    warmup_s: float
    measure_s: float
    many_max_sessions: int
    features: int
    label: str  # distinguishes made-up session ids between processes
    result_path: str


class Recorder:
    """Counts what completes in the measurement window: session-steps and the
    latency of each call, or the failures by RPC and status code."""

    def __init__(self, t0: float, plan: LoadPlan):
        self.window_start = t0 + plan.warmup_s
        self.window_end = self.window_start + plan.measure_s
        self.latencies: list[float] = []
        self.steps = 0
        self.failures: collections.Counter[str] = collections.Counter()

    def running(self) -> bool:
        return time.monotonic() < self.window_end

    def record(self, sent: float, steps: int) -> None:
        done = time.monotonic()
        if self.window_start <= done < self.window_end:
            self.latencies.append(done - sent)
            self.steps += steps

    def fail(self, what: str) -> None:
        if self.window_start <= time.monotonic() < self.window_end:
            self.failures[what] += 1


async def run(plan: LoadPlan) -> dict:
    """Probes, reports ready, waits for `go`, steps; saves the latencies."""
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(plan.target, options=options) as channel:
        stub = pb_grpc.SequenceServiceStub(channel)
        ids = plan.session_ids or [f"{plan.label}-{i}" for i in range(plan.sessions)]
        requests = build_requests(plan, ids)
        unavailable = await probe(stub, plan.style, requests)
        print(f"unavailable {unavailable}" if unavailable else "ready", flush=True)
        command = await asyncio.to_thread(sys.stdin.readline)
        if unavailable or not command.startswith("go "):
            return {"unavailable": unavailable or "stopped"}
        recorder = Recorder(float(command.split()[1]), plan)
        await _until_window_end(DRIVERS[plan.style](stub, requests, recorder), recorder)
    np.save(plan.result_path + ".npy", np.array(recorder.latencies))
    return {"steps": recorder.steps, "failures": dict(recorder.failures)}


async def _until_window_end(driver, recorder: Recorder) -> None:
    """Runs the driver, then cancels the calls still in flight at the window's end.

    They could not count any more, and waiting for thousands of them would
    only lengthen the run.
    """
    task = asyncio.create_task(driver)
    await asyncio.wait([task], timeout=recorder.window_end - time.monotonic())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_requests(plan: LoadPlan, ids: list[str]) -> list:
    """StepRequests (unary, stream) or StepManyRequests (many), built once."""
    frames = np.random.default_rng(0).standard_normal((len(ids), 1, plan.features))
    frames = frames.astype("<f4")
    if plan.style != "many":
        return [
            pb.StepRequest(session_id=i, inputs=_tensor(x)) for i, x in zip(ids, frames)
        ]
    size = plan.many_max_sessions
    return [
        pb.StepManyRequest(
            session_ids=ids[s : s + size], inputs=_tensor(frames[s : s + size])
        )
        for s in range(0, len(ids), size)
    ]


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes()
    )


async def probe(stub, style: str, requests: list) -> str:
    """Steps once in the given style; returns the status code name if it fails."""
    try:
        if style == "unary":
            await stub.Step(requests[0])
        elif style == "many":
            await stub.StepMany(requests[0])
        else:
            call = stub.StepStream()
            await call.write(requests[0])
            await call.read()
            await call.done_writing()
            await call.read()
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return ""


async def drive_unary(stub, requests: list, recorder: Recorder) -> None:
    async def session_loop(request):
        while recorder.running():
            sent = time.monotonic()
            try:
                await stub.Step(request)
            except grpc.aio.AioRpcError as error:
                recorder.fail(f"Step {error.code().name}")
            else:
                recorder.record(sent, 1)

    await asyncio.gather(*(session_loop(r) for r in requests))


async def drive_stream(stub, requests: list, recorder: Recorder) -> None:
    """One stream; replies come in request order, so a FIFO matches them.

    A step's latency runs from when its session is ready to step (its previous
    reply arrived) to its reply, so it includes waiting for the stream's writer.
    """
    call = stub.StepStream()
    ready: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    in_flight: collections.deque[tuple[int, float]] = collections.deque()

    async def write():
        for index in range(len(requests)):
            ready.put_nowait((index, time.monotonic()))
        while (step := await ready.get()) is not None:
            in_flight.append(step)
            await call.write(requests[step[0]])
        await call.done_writing()

    async def read():
        while (outcome := await call.read()) is not grpc.aio.EOF:
            index, sent = in_flight.popleft()
            if outcome.HasField("error"):
                recorder.fail(f"StepStream outcome {_code_name(outcome.error.code)}")
            else:
                recorder.record(sent, 1)
            if recorder.running():
                ready.put_nowait((index, time.monotonic()))
            elif not in_flight:
                ready.put_nowait(None)

    try:
        await asyncio.gather(write(), read())
    except grpc.aio.AioRpcError as error:
        recorder.fail(f"StepStream {error.code().name}")


async def drive_many(stub, requests: list, recorder: Recorder) -> None:
    """StepMany is all or nothing: a refused message steps none of its sessions."""

    async def message_loop(request):
        sessions = len(request.session_ids)
        while recorder.running():
            sent = time.monotonic()
            try:
                await stub.StepMany(request)
            except grpc.aio.AioRpcError as error:
                recorder.fail(f"StepMany {error.code().name}")
            else:
                recorder.record(sent, sessions)

    await asyncio.gather(*(message_loop(r) for r in requests))


def _code_name(code: int) -> str:
    names = {c.value[0]: c.name for c in grpc.StatusCode}
    return names.get(code, str(code))


DRIVERS = {"unary": drive_unary, "stream": drive_stream, "many": drive_many}


def main() -> None:
    plan = LoadPlan(**json.loads(sys.stdin.readline()))
    result = asyncio.run(run(plan))
    Path(plan.result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
