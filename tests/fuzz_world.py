"""One fuzzed server, its sessions, and the checks made after every example.

Two target sessions per model may be addressed by fuzzed requests; a canary
never is. After each example: the canary's state is what it was, each target's
state is what it was unless a request addressed to it succeeded (and is finite
either way), and a valid step with reset still gives Keras' outputs. The world
also keeps one exported session (ended since), for fuzzed imports.
"""

import collections
import contextlib
import os
from pathlib import Path

import grpc
import numpy as np
from grpc import StatusCode
from hypothesis import HealthCheck, settings

from seqserve.v1 import admin_pb2 as admin_pb
from seqserve.v1 import admin_pb2_grpc as admin_grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from conftest import running_server
from fuzz_requests import (
    MAX_TIMESTEPS,
    MODELS,
    TARGETS_PER_MODEL,
    target_id,
    target_ids,
)
from rpc_helpers import TIMEOUT_S, outputs, tensor
from small_models import (
    embedding_model,
    frames,
    gru_model,
    lstm_model,
    offline_outputs,
    save_models,
)

CANARY = "canary-5e2d07"
ALIVE = "alive-91ab4c"
EXPORTED = "exported-3c1f"
SERVICE = "/seqserve.v1.SequenceService/"
ADMIN_SERVICE = "/seqserve.v1.AdminService/"
ADMIN_METHODS = frozenset(
    {"ListSessions", "DescribeSession", "EvictSession", "EvictSessions"}
)
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(examples: int):
    """`examples` times FUZZ_SCALE, derandomized, so that a run is reproducible."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )


@contextlib.contextmanager
def fuzz_world(directory: Path, config):
    """A server on the three small models, and its FuzzWorld; on exit, the canary
    must still continue exactly as Keras, and the request counts are printed."""
    keras_models = {
        "lstm": lstm_model(),
        "gru": gru_model(),
        "tokens": embedding_model(),
    }
    save_models(directory, keras_models)
    with running_server(directory, max_timesteps=MAX_TIMESTEPS) as app:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            world = FuzzWorld(
                pb_grpc.SequenceServiceStub(channel), channel, keras_models
            )
            yield world
            world.assert_canary_matches_keras()
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{world.summary()}")


class FuzzWorld:
    def __init__(self, stub, channel: grpc.Channel, keras_models):
        self.stub = stub
        self.channel = channel
        self.admin = admin_grpc.AdminServiceStub(channel)
        self.keras_models = keras_models
        self.sent: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.regressions: set[str] = set()  # fixed cases sent, by name
        self.baselines: dict[str, pb.GetStateResponse] = {}
        rng = np.random.default_rng(5)
        self.canary_history = frames(rng, 5)
        self._start(CANARY, "lstm", self.canary_history)
        self.canary = self._snapshot(CANARY)
        self.alive_inputs = frames(rng, 3)
        self.alive_expected = offline_outputs(keras_models["lstm"], self.alive_inputs)
        self._start(ALIVE, "lstm")
        for model in MODELS:
            for index in range(TARGETS_PER_MODEL):
                self._restore_target(model, index)
        self.export, self.exported_state = self._export_ended(rng)

    def call(self, method: str, request) -> tuple[StatusCode, object]:
        """Sends one fuzzed request; returns its status code and reply (or None)."""
        self.sent[method] += 1
        stub = self.admin if hasattr(self.admin, method) else self.stub
        try:
            reply = getattr(stub, method)(request, timeout=TIMEOUT_S)
            code = StatusCode.OK
        except grpc.RpcError as error:
            code, reply = error.code(), None
        self.codes[code.name] += 1
        return code, reply

    def call_raw(self, method: str, payload: bytes) -> tuple[StatusCode, bytes]:
        """Sends `payload` as the serialized request of a unary `method`."""
        self.sent[method] += 1
        service = ADMIN_SERVICE if method in ADMIN_METHODS else SERVICE
        call = self.channel.unary_unary(service + method)  # bytes in, bytes out
        try:
            reply, code = call(payload, timeout=TIMEOUT_S), StatusCode.OK
        except grpc.RpcError as error:
            reply, code = None, error.code()
        self.codes[code.name] += 1
        return code, reply

    def summary(self) -> str:
        counts = ", ".join(f"{m} {n}" for m, n in sorted(self.sent.items()))
        codes = ", ".join(f"{c} {n}" for c, n in sorted(self.codes.items()))
        total = sum(self.sent.values())
        return (
            f"fuzzed requests: {total} ({counts}); statuses: {codes}; fixed "
            f"regression cases: {len(self.regressions)}"
        )

    def taken_ids(self) -> frozenset[str]:
        """The ids live between examples: an import under one is ALREADY_EXISTS."""
        return frozenset({CANARY, ALIVE, *target_ids()})

    def check(self, changed: set[str] = frozenset()) -> None:
        """The checks after an example; `changed`: target ids a successful request
        addressed, whose state may have changed (or that may have ended)."""
        assert self._snapshot(CANARY) == self.canary
        for model in MODELS:
            for index in range(TARGETS_PER_MODEL):
                session_id = target_id(model, index)
                if session_id in changed:
                    self._refresh(model, index)
                else:
                    assert self._snapshot(session_id) == self.baselines[session_id]
        self._assert_alive()

    def step_numbers(self) -> dict[str, int]:
        """Each target's step number, as of the last check."""
        return {i: snapshot.step_number for i, snapshot in self.baselines.items()}

    def check_imported(self, reply: pb.ImportSessionResponse, exact: bool) -> None:
        """An imported session works like any other and can be ended; `exact`:
        it is the exported session, unchanged."""
        session_id = reply.session_id
        described = self.admin.DescribeSession(
            admin_pb.DescribeSessionRequest(session_id=session_id), timeout=TIMEOUT_S
        ).session
        assert (described.model, described.version) == (reply.model.name, 1)
        listed = self.admin.ListSessions(admin_pb.ListSessionsRequest())
        assert session_id in [s.session_id for s in listed.sessions]
        snapshot = self._snapshot(session_id)
        if exact:
            assert snapshot.state == self.exported_state.state
            assert snapshot.step_number == self.exported_state.step_number
        for part in snapshot.state.parts:
            assert np.isfinite(np.frombuffer(part.value.data, "<f4")).all(), part
        step = pb.StepRequest(
            session_id=session_id,
            inputs=tensor(self.alive_inputs),
            step_number=reply.step_number + 1,
        )
        stepped = self.stub.Step(step, timeout=TIMEOUT_S)
        assert np.isfinite(outputs(stepped)).all()
        assert stepped.step_number == reply.step_number + 1
        self.stub.EndSession(pb.EndSessionRequest(session_id=session_id))

    def expect_state(self, session_id: str, reply: pb.StepResponse) -> None:
        """After a stream: the stored state is the last accepted step's."""
        snapshot = self._snapshot(session_id)
        assert snapshot.state == reply.state
        assert snapshot.timesteps == reply.timesteps

    def assert_canary_matches_keras(self) -> None:
        chunk = frames(np.random.default_rng(6), 2)
        reply = self.stub.Step(pb.StepRequest(session_id=CANARY, inputs=tensor(chunk)))
        sequence = np.concatenate([self.canary_history, chunk])
        expected = offline_outputs(self.keras_models["lstm"], sequence)[-2:]
        np.testing.assert_allclose(outputs(reply), expected, atol=1e-5)

    def end_started(self, reply: pb.StartSessionResponse) -> None:
        """Ends a session that a fuzzed StartSession made, unless it is a target."""
        if reply.session_id not in target_ids():
            self.stub.EndSession(pb.EndSessionRequest(session_id=reply.session_id))

    def _refresh(self, model: str, index: int) -> None:
        session_id = target_id(model, index)
        try:
            snapshot = self._snapshot(session_id)
            # Finite requests must leave a finite state: a NaN would poison every
            # later step of the session, and SetState could not repair it.
            for part in snapshot.state.parts:
                assert np.isfinite(np.frombuffer(part.value.data, "<f4")).all(), part
            self.baselines[session_id] = snapshot
        except grpc.RpcError as error:
            assert error.code() == StatusCode.NOT_FOUND  # a fuzzed EndSession
            self._restore_target(model, index)

    def _restore_target(self, model: str, index: int) -> None:
        session_id = target_id(model, index)
        rng = np.random.default_rng(len(self.baselines))
        spec = MODELS[model]
        history = (
            rng.integers(0, spec.vocabulary, 4).astype(np.int32)
            if spec.vocabulary
            else frames(rng, 4)
        )
        self._start(session_id, model, history)
        self.baselines[session_id] = self._snapshot(session_id)

    def _start(self, session_id: str, model: str, history=None) -> None:
        request = pb.StartSessionRequest(model=model, session_id=session_id)
        self.stub.StartSession(request, timeout=TIMEOUT_S)
        if history is not None:
            step = pb.StepRequest(session_id=session_id, inputs=tensor(history))
            self.stub.Step(step, timeout=TIMEOUT_S)

    def _export_ended(self, rng) -> tuple[bytes, pb.GetStateResponse]:
        """An export of a session with a numbered last step, which has ended
        since, so that importing the bytes as they are succeeds."""
        self._start(EXPORTED, "lstm", frames(rng, 3))
        step = pb.StepRequest(
            session_id=EXPORTED, inputs=tensor(frames(rng, 2)), step_number=2
        )
        self.stub.Step(step, timeout=TIMEOUT_S)
        state = self._snapshot(EXPORTED)
        request = pb.ExportSessionRequest(session_id=EXPORTED)
        data = self.stub.ExportSession(request, timeout=TIMEOUT_S).session
        self.stub.EndSession(pb.EndSessionRequest(session_id=EXPORTED))
        return data, state

    def _snapshot(self, session_id: str) -> pb.GetStateResponse:
        request = pb.GetStateRequest(session_id=session_id)
        return self.stub.GetState(request, timeout=TIMEOUT_S)

    def _assert_alive(self) -> None:
        request = pb.StepRequest(
            session_id=ALIVE, inputs=tensor(self.alive_inputs), reset=True
        )
        reply = self.stub.Step(request, timeout=TIMEOUT_S)
        np.testing.assert_allclose(outputs(reply), self.alive_expected, atol=1e-5)
