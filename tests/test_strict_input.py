"""Malformed requests get a precise status and change nothing on the server.

Requests go through the raw stub, because the client casts or hides what these
tests need to send. After each refusal the session's state must be what it was
(GetState compared before and after), and the next valid step must continue it
exactly as one offline Keras call on the whole sequence would.
"""

import numpy as np
import pytest
from grpc import StatusCode

from seqserve.v1 import seqserve_pb2 as pb

from conftest import running_server
from rpc_helpers import (
    outputs,
    raw_tensor,
    refusal,
    state,
    status_of,
    stub_for,
    tensor,
)
from small_models import (
    GRU_UNITS,
    LSTM_UNITS,
    VOCABULARY,
    embedding_model,
    frames,
    gru_model,
    lstm_model,
    offline_outputs,
    save_models,
)

F32 = pb.DATA_TYPE_FLOAT32
PER_TIMESTEP = {"lstm": True, "gru": False, "tokens": False}


@pytest.fixture(scope="module")
def keras_models():
    return {"lstm": lstm_model(), "gru": gru_model(), "tokens": embedding_model()}


@pytest.fixture(scope="module")
def stub(tmp_path_factory, keras_models):
    directory = save_models(tmp_path_factory.mktemp("strict"), keras_models)
    with running_server(directory) as app, stub_for(app) as stub:
        yield stub


class Probe:
    """A session with a known, non-zero history, to show a refusal changed nothing."""

    def __init__(self, stub, model_name: str, keras_model, seed: int):
        self.stub = stub
        self.model_name = model_name
        self.keras_model = keras_model
        self.rng = np.random.default_rng(seed)
        reply = stub.StartSession(pb.StartSessionRequest(model=model_name))
        self.id = reply.session_id
        self.history = self.chunk(4)
        stub.Step(pb.StepRequest(session_id=self.id, inputs=tensor(self.history)))
        self.before = self.snapshot()

    def chunk(self, timesteps: int) -> np.ndarray:
        if self.model_name == "tokens":
            return self.rng.integers(0, VOCABULARY, timesteps).astype(np.int32)
        return frames(self.rng, timesteps)

    def snapshot(self) -> pb.GetStateResponse:
        return self.stub.GetState(pb.GetStateRequest(session_id=self.id))

    def assert_refused(self, method, request, code: StatusCode) -> None:
        assert status_of(method, request) == code
        self.assert_unchanged()

    def assert_unchanged(self) -> None:
        assert self.snapshot() == self.before

        chunk = self.chunk(3)
        request = pb.StepRequest(session_id=self.id, inputs=tensor(chunk))
        reply = self.stub.Step(request)

        sequence = np.concatenate([self.history, chunk])
        expected = offline_outputs(self.keras_model, sequence)
        if PER_TIMESTEP[self.model_name]:
            expected = expected[-len(chunk) :]
        np.testing.assert_allclose(outputs(reply), expected, atol=1e-5)
        assert reply.timesteps == self.before.timesteps + len(chunk)


@pytest.fixture
def lstm(stub, keras_models):
    return Probe(stub, "lstm", keras_models["lstm"], seed=10)


@pytest.fixture
def gru(stub, keras_models):
    return Probe(stub, "gru", keras_models["gru"], seed=11)


@pytest.fixture
def tokens(stub, keras_models):
    return Probe(stub, "tokens", keras_models["tokens"], seed=12)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def filled(value):
    x = np.ones((2, 3), np.float32)
    x[1, 2] = value
    return tensor(x)


BAD_INPUTS = {
    "rank 0": tensor(np.float32(1)),
    "rank 1": tensor(zeros(3)),
    "rank 3": tensor(zeros((1, 2, 3))),
    "feature width 2": tensor(zeros((2, 2))),
    "feature width 4": tensor(zeros((2, 4))),
    "zero timesteps": tensor(zeros((0, 3))),
    "float64": tensor(zeros((2, 3), np.float64)),
    "int32": tensor(zeros((2, 3), np.int32)),
    "bytes short": raw_tensor(F32, [2, 3], zeros(5).tobytes()),
    "bytes long": raw_tensor(F32, [2, 3], zeros(7).tobytes()),
    "bytes ragged": raw_tensor(F32, [2, 3], bytes(23)),
    "negative dims": raw_tensor(F32, [-2, -3], zeros(6).tobytes()),
    "negative time": raw_tensor(F32, [-1, 3], b""),
    "empty but huge": raw_tensor(F32, [0, 2**62], b""),
    "nan": filled(np.nan),
    "+inf": filled(np.inf),
    "-inf": filled(-np.inf),
    "unspecified dtype": raw_tensor(pb.DATA_TYPE_UNSPECIFIED, [2, 3], bytes(24)),
    "unknown dtype enum": raw_tensor(99, [2, 3], bytes(24)),
    "absent": pb.Tensor(),
}


@pytest.mark.parametrize("inputs", BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_bad_inputs_are_invalid_and_change_nothing(lstm, inputs):
    request = pb.StepRequest(session_id=lstm.id, inputs=inputs)
    lstm.assert_refused(lstm.stub.Step, request, StatusCode.INVALID_ARGUMENT)


H = np.full(LSTM_UNITS, 0.25, np.float32)


def with_h(value):
    return [("lstm", "h", value), ("lstm", "c", H)]


BAD_LSTM_STATES = {
    "no parts": [],
    "h only": [("lstm", "h", H)],
    "c only": [("lstm", "c", H)],
    "h of units+1": with_h(zeros(LSTM_UNITS + 1)),
    "h of units-1": with_h(zeros(LSTM_UNITS - 1)),
    "h batch 2": with_h(zeros((2, LSTM_UNITS))),
    "h batch 1": with_h(zeros((1, LSTM_UNITS))),
    "h scalar": with_h(np.float32(0)),
    "h float64": with_h(zeros(LSTM_UNITS, np.float64)),
    "h int32": with_h(zeros(LSTM_UNITS, np.int32)),
    "h nan": with_h(np.full(LSTM_UNITS, np.nan, np.float32)),
    "h +inf": with_h(np.full(LSTM_UNITS, np.inf, np.float32)),
    "c -inf": [("lstm", "h", H), ("lstm", "c", np.full(LSTM_UNITS, -np.inf, "f4"))],
    "h bytes short": with_h(raw_tensor(F32, [LSTM_UNITS], bytes(4))),
    "h dtype enum": with_h(raw_tensor(42, [LSTM_UNITS], bytes(4 * LSTM_UNITS))),
    "unknown part": [*with_h(H), ("lstm", "x", H)],
    "unknown layer": [("lstm", "h", H), ("encoder", "c", H)],
    "another model's layer": [*with_h(H), ("gru", "h", zeros(GRU_UNITS))],
    "h twice": [*with_h(H), ("lstm", "h", H)],
    "h twice, no c": [("lstm", "h", H), ("lstm", "h", H)],
}


def step_with(probe, parts):
    request = pb.StepRequest(session_id=probe.id, inputs=tensor(probe.chunk(2)))
    request.state.CopyFrom(state(*parts))
    return probe.stub.Step, request


def reset_with(probe, parts):
    return probe.stub.Reset, pb.ResetRequest(session_id=probe.id, state=state(*parts))


def set_with(probe, parts):
    return probe.stub.SetState, pb.SetStateRequest(
        session_id=probe.id, state=state(*parts)
    )


CARRIERS = {"Step": step_with, "Reset": reset_with, "SetState": set_with}


@pytest.mark.parametrize("carrier", CARRIERS.values(), ids=list(CARRIERS))
@pytest.mark.parametrize("parts", BAD_LSTM_STATES.values(), ids=list(BAD_LSTM_STATES))
def test_bad_states_are_invalid_and_change_nothing(lstm, carrier, parts):
    method, request = carrier(lstm, parts)
    lstm.assert_refused(method, request, StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("parts", BAD_LSTM_STATES.values(), ids=list(BAD_LSTM_STATES))
def test_bad_initial_state_starts_no_session(stub, parts):
    proposed = "bad-initial-state"
    request = pb.StartSessionRequest(
        model="lstm", session_id=proposed, initial_state=state(*parts)
    )
    assert status_of(stub.StartSession, request) == StatusCode.INVALID_ARGUMENT

    lookup = pb.GetStateRequest(session_id=proposed)
    assert status_of(stub.GetState, lookup) == StatusCode.NOT_FOUND
    good = pb.StartSessionRequest(model="lstm", session_id=proposed)
    assert stub.StartSession(good).session_id == proposed
    stub.EndSession(pb.EndSessionRequest(session_id=proposed))


G = np.full(GRU_UNITS, 0.5, np.float32)


@pytest.mark.parametrize("carrier", CARRIERS.values(), ids=list(CARRIERS))
def test_gru_refuses_a_c_part_that_keras_would_ignore(gru, carrier):
    method, request = carrier(gru, [("gru", "h", G), ("gru", "c", G)])
    gru.assert_refused(method, request, StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("parts", [[("gru", "h", zeros(GRU_UNITS + 1))], []])
def test_gru_refuses_a_wrong_h(gru, parts):
    method, request = set_with(gru, parts)
    gru.assert_refused(method, request, StatusCode.INVALID_ARGUMENT)


def test_reset_together_with_a_state_is_invalid(lstm):
    method, request = step_with(lstm, [("lstm", "h", H), ("lstm", "c", H)])
    request.reset = True
    lstm.assert_refused(method, request, StatusCode.INVALID_ARGUMENT)


TOKEN_INPUTS = {
    "float32": tensor(np.ones(3, np.float32)),
    "int64": tensor(np.ones(3, np.int64)),
    "rank 2": tensor(np.ones((3, 1), np.int32)),
    "zero timesteps": tensor(np.ones(0, np.int32)),
}


@pytest.mark.parametrize("inputs", TOKEN_INPUTS.values(), ids=list(TOKEN_INPUTS))
def test_embedding_model_refuses_other_inputs(tokens, inputs):
    request = pb.StepRequest(session_id=tokens.id, inputs=inputs)
    tokens.assert_refused(tokens.stub.Step, request, StatusCode.INVALID_ARGUMENT)


# Past the vocabulary the model fails; a negative id would silently read a row.
@pytest.mark.parametrize("token", [VOCABULARY, -1])
def test_token_outside_the_vocabulary_is_invalid(tokens, token):
    inputs = tensor(np.array([1, token], np.int32))
    request = pb.StepRequest(session_id=tokens.id, inputs=inputs)
    tokens.assert_refused(tokens.stub.Step, request, StatusCode.INVALID_ARGUMENT)


def session_calls(stub, session_id):
    """Every call that names a session, with otherwise valid contents."""
    return {
        "Step": (
            stub.Step,
            pb.StepRequest(session_id=session_id, inputs=tensor(zeros((1, 3)))),
        ),
        "Reset": (stub.Reset, pb.ResetRequest(session_id=session_id)),
        "GetState": (stub.GetState, pb.GetStateRequest(session_id=session_id)),
        "SetState": (
            stub.SetState,
            pb.SetStateRequest(
                session_id=session_id, state=state(("lstm", "h", H), ("lstm", "c", H))
            ),
        ),
        "EndSession": (stub.EndSession, pb.EndSessionRequest(session_id=session_id)),
    }


CALLS = ["Step", "Reset", "GetState", "SetState", "EndSession"]


@pytest.mark.parametrize("call", CALLS)
def test_missing_session_id_is_invalid(stub, call):
    method, request = session_calls(stub, "")[call]
    assert status_of(method, request) == StatusCode.INVALID_ARGUMENT


MALFORMED_IDS = ["has space", "a/b", "caf\u00e9", "tab\t", "line\n", "x" * 129]


@pytest.mark.parametrize("session_id", MALFORMED_IDS, ids=range(len(MALFORMED_IDS)))
def test_malformed_session_id_is_invalid(stub, session_id):
    start = pb.StartSessionRequest(model="lstm", session_id=session_id)
    assert status_of(stub.StartSession, start) == StatusCode.INVALID_ARGUMENT
    method, request = session_calls(stub, session_id)["GetState"]
    assert status_of(method, request) == StatusCode.INVALID_ARGUMENT


def test_longest_id_of_every_allowed_character_is_accepted(stub):
    alphabet = "ABCXYZabcxyz0189._:-"
    proposed = (alphabet * 7)[:128]
    reply = stub.StartSession(pb.StartSessionRequest(model="gru", session_id=proposed))
    assert reply.session_id == proposed
    stub.EndSession(pb.EndSessionRequest(session_id=proposed))


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_live_id_already_exists_and_is_left_alone(lstm, model):
    request = pb.StartSessionRequest(model=model, session_id=lstm.id)
    lstm.assert_refused(lstm.stub.StartSession, request, StatusCode.ALREADY_EXISTS)


def test_unknown_model_is_not_found_and_empty_model_is_invalid(stub):
    unknown = pb.StartSessionRequest(model="no_such_model")
    assert status_of(stub.StartSession, unknown) == StatusCode.NOT_FOUND
    empty = pb.StartSessionRequest(model="")
    assert status_of(stub.StartSession, empty) == StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("call", CALLS)
def test_unknown_session_is_not_found_and_says_unknown(stub, call):
    method, request = session_calls(stub, "never-started")[call]
    error = refusal(method, request)
    assert error.code() == StatusCode.NOT_FOUND
    assert "unknown" in error.details()


@pytest.mark.parametrize("call", CALLS)
def test_ended_session_is_not_found_and_says_ended(lstm, call):
    lstm.stub.EndSession(pb.EndSessionRequest(session_id=lstm.id))
    method, request = session_calls(lstm.stub, lstm.id)[call]
    error = refusal(method, request)
    assert error.code() == StatusCode.NOT_FOUND
    assert "ended" in error.details()


def test_ended_id_can_start_again_from_zeros(lstm):
    lstm.stub.EndSession(pb.EndSessionRequest(session_id=lstm.id))
    request = pb.StartSessionRequest(model="lstm", session_id=lstm.id)
    assert lstm.stub.StartSession(request).session_id == lstm.id

    fresh = lstm.snapshot()
    assert fresh.timesteps == 0
    assert all(
        not np.frombuffer(p.value.data, np.float32).any() for p in fresh.state.parts
    )
