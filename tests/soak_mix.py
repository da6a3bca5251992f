"""One soak client thread: a seeded mix of calls over sessions it tracks.

A worker knows the sequence each of its sessions took since its last reset,
so that the sessions can be compared with Keras at the end. A session may
expire when the mix leaves it alone past the idle timeout; a call then gets
NOT_FOUND and the worker checks that it had indeed been idle.
"""

import collections
import dataclasses
import time

import grpc
import numpy as np
from grpc import StatusCode

from seqserve.v1 import seqserve_pb2 as pb

from rpc_helpers import TIMEOUT_S, state, tensor
from small_models import GRU_UNITS, frames, offline_state

IDLE_TIMEOUT_S = 2.0
MAX_TRACKED = 6
LAYER = {"lstm": "lstm", "gru": "gru"}
ACTIONS = {
    "start": 2,
    "step": 8,
    "many": 2,
    "stream": 2,
    "reset": 1,
    "end": 1,
    "idle": 1,
    "bad": 2,
}


@dataclasses.dataclass
class Tracked:
    id: str
    model: str
    chunks: list = dataclasses.field(default_factory=list)
    last_used_s: float = dataclasses.field(default_factory=time.monotonic)
    gone: bool = False  # expired

    def stepped(self, inputs: np.ndarray) -> None:
        self.chunks.append(inputs)
        self.last_used_s = time.monotonic()


class SoakWorker:
    def __init__(self, stub, seed: int):
        self.stub = stub
        self.rng = np.random.default_rng(seed)
        self.tracked: list[Tracked] = []
        self.idle: list[tuple[str, float]] = []  # (id, last call)
        self.counts: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None
        self._actions = list(ACTIONS)
        weights = np.array(list(ACTIONS.values()), float)
        self._weights = weights / weights.sum()

    def run(self, until_s: float) -> None:
        try:
            while time.monotonic() < until_s:
                action = self.rng.choice(self._actions, p=self._weights)
                self.counts[str(action)] += 1
                getattr(self, "_" + action)()
        except BaseException as error:  # re-raised by the test's thread
            self.error = error

    # The mix -----------------------------------------------------------------

    def _start(self) -> None:
        if len(self.tracked) >= MAX_TRACKED:
            return self._end()
        model = str(self.rng.choice(list(LAYER)))
        reply = self._call("StartSession", pb.StartSessionRequest(model=model))
        self.tracked.append(Tracked(reply.session_id, model))

    def _step(self) -> None:
        if (session := self._pick()) is None:
            return self._start()
        inputs = frames(self.rng, int(self.rng.integers(1, 6)))
        request = pb.StepRequest(session_id=session.id, inputs=tensor(inputs))
        if self._call_tracked(session, "Step", request) is not None:
            session.stepped(inputs)

    def _many(self) -> None:
        model = str(self.rng.choice(list(LAYER)))
        group = [s for s in self.tracked if s.model == model]
        if not group:
            return self._start()
        inputs = np.stack([frames(self.rng, 2) for _ in group])
        request = pb.StepManyRequest(
            session_ids=[s.id for s in group], inputs=tensor(inputs)
        )
        try:
            self._call("StepMany", request)
        except grpc.RpcError as error:
            assert error.code() == StatusCode.NOT_FOUND, error
            self._drop_expired(group)  # all or nothing: none of them stepped
            return
        for session, rows in zip(group, inputs):
            session.stepped(rows)

    def _stream(self) -> None:
        if not self.tracked:
            return self._start()
        plan = [
            (self.tracked[int(i)], frames(self.rng, 1))
            for i in self.rng.integers(0, len(self.tracked), 8)
        ]
        requests = (pb.StepRequest(session_id=s.id, inputs=tensor(x)) for s, x in plan)
        replies = list(self.stub.StepStream(requests, timeout=TIMEOUT_S))
        assert len(replies) == len(plan)
        for (session, inputs), reply in zip(plan, replies):
            if reply.HasField("response"):
                session.stepped(inputs)
            else:
                assert reply.error.code == StatusCode.NOT_FOUND.value[0], reply
                self._assert_idled(session)
        self.tracked = [s for s in self.tracked if not s.gone]

    def _reset(self) -> None:
        if (session := self._pick()) is None:
            return
        request = pb.ResetRequest(session_id=session.id)
        if self._call_tracked(session, "Reset", request) is not None:
            session.chunks.clear()
            session.last_used_s = time.monotonic()

    def _end(self) -> None:
        if (session := self._pick()) is None:
            return
        request = pb.EndSessionRequest(session_id=session.id)
        self._call_tracked(session, "EndSession", request)
        if session in self.tracked:
            self.tracked.remove(session)

    def _idle(self) -> None:
        """A session stepped once and then left alone: it must expire."""
        reply = self._call("StartSession", pb.StartSessionRequest(model="gru"))
        request = pb.StepRequest(
            session_id=reply.session_id, inputs=tensor(frames(self.rng, 1))
        )
        self._call("Step", request)
        self.idle.append((reply.session_id, time.monotonic()))

    def _bad(self) -> None:
        """A malformed request on a tracked session: refused, nothing changes."""
        if (session := self._pick()) is None:
            return self._start()
        wrong = [
            pb.StepRequest(
                session_id=session.id, inputs=tensor(np.zeros((2, 5), "f4"))
            ),
            pb.StepRequest(
                session_id=session.id, inputs=tensor(np.full((1, 3), np.nan, "f4"))
            ),
            pb.SetStateRequest(
                session_id=session.id,
                state=state(("nope", "h", np.zeros(GRU_UNITS, "f4"))),
            ),
        ]
        request = wrong[int(self.rng.integers(0, len(wrong)))]
        method = "Step" if isinstance(request, pb.StepRequest) else "SetState"
        try:
            self._call(method, request)
        except grpc.RpcError as error:
            if error.code() == StatusCode.NOT_FOUND:  # checked after the format
                return self._forget_if_idled(session)
            assert error.code() == StatusCode.INVALID_ARGUMENT, error
            return
        raise AssertionError(f"a malformed {method} succeeded")

    # Checks ------------------------------------------------------------------

    def snapshot_survivors(self) -> None:
        """Reads each surviving session's state; they are then left to expire."""
        self._snapshots = []
        for session in list(self.tracked):
            request = pb.GetStateRequest(session_id=session.id)
            final = self._call_tracked(session, "GetState", request)
            if final is not None:
                self._snapshots.append((session, final))

    def check_survivors(self, keras_models) -> None:
        """Each snapshot equals Keras over the session's sequence since its reset."""
        for session, final in self._snapshots:
            expected = _offline(keras_models[session.model], session)
            served = [
                np.frombuffer(p.value.data, np.float32) for p in final.state.parts
            ]
            assert final.timesteps == sum(len(c) for c in session.chunks)
            for got, want in zip(served, expected):
                np.testing.assert_allclose(got, want, atol=1e-4)

    def check_everything_expired(self) -> None:
        """Run after the idle timeout: the idle sessions and the survivors."""
        for session_id in [i for i, _ in self.idle] + [
            s.id for s, _ in self._snapshots
        ]:
            try:
                self._call("GetState", pb.GetStateRequest(session_id=session_id))
            except grpc.RpcError as error:
                assert error.code() == StatusCode.NOT_FOUND
                continue
            raise AssertionError(f"session {session_id} did not expire")

    # Helpers -----------------------------------------------------------------

    def _pick(self) -> Tracked | None:
        if not self.tracked:
            return None
        return self.tracked[int(self.rng.integers(0, len(self.tracked)))]

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=TIMEOUT_S)

    def _call_tracked(self, session: Tracked, method: str, request):
        """The reply, or None when the session had idled out (then dropped)."""
        try:
            return self._call(method, request)
        except grpc.RpcError as error:
            assert error.code() == StatusCode.NOT_FOUND, error
            self._forget_if_idled(session)
            return None

    def _forget_if_idled(self, session: Tracked) -> None:
        self._assert_idled(session)
        if session in self.tracked:
            self.tracked.remove(session)

    def _assert_idled(self, session: Tracked) -> None:
        idle_s = time.monotonic() - session.last_used_s
        assert idle_s > IDLE_TIMEOUT_S - 0.25, f"{session.id} gone after {idle_s} s"
        session.gone = True

    def _drop_expired(self, group: list[Tracked]) -> None:
        for session in group:
            request = pb.GetStateRequest(session_id=session.id)
            self._call_tracked(session, "GetState", request)


def _offline(keras_model, session: Tracked) -> list[np.ndarray]:
    if not session.chunks:
        units = keras_model.get_layer(LAYER[session.model]).units
        parts = 2 if session.model == "lstm" else 1
        return [np.zeros(units, np.float32)] * parts
    return offline_state(
        keras_model, LAYER[session.model], np.concatenate(session.chunks)
    )
