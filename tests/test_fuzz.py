"""Fuzzing every RPC at the protobuf level against one real server.

Each example is one request (or one stream) drawn by hypothesis, valid or with
one or more flaws (fuzz_requests.py). Its status must be OK when it has no
flaw, else the code of one of its flaws; never UNKNOWN or INTERNAL. After each
example, FuzzWorld.check shows that no session changed that was not meant to,
and that the server still steps a valid request exactly as Keras.

Examples are derandomized, so a run is reproducible. The CI size takes about
two minutes; FUZZ_SCALE=10 (an environment variable) runs ten times as many.
The module prints how many requests it sent.
"""

import numpy as np
import pytest
from grpc import StatusCode
from hypothesis import given
from hypothesis import strategies as st

from seqserve.v1 import admin_pb2 as admin_pb
from seqserve.v1 import seqserve_pb2 as pb

from fuzz_exports import import_bytes
from fuzz_requests import (
    ABORTED,
    ALREADY_EXISTS,
    INVALID,
    MODELS,
    NOT_FOUND,
    TARGETS_PER_MODEL,
    Drawn,
    expected_codes,
    inputs_for,
    long_texts,
    session_ids,
    states_for,
    target_id,
)
from fuzz_world import FuzzWorld, fuzz_settings, fuzz_world
from rpc_helpers import raw_tensor, state

F32 = pb.DATA_TYPE_FLOAT32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    with fuzz_world(tmp_path_factory.mktemp("fuzz"), request.config) as world:
        yield world


def assert_code(code: StatusCode, expected: frozenset) -> None:
    assert code in expected, f"status {code.name}, expected one of {expected}"


# Request builders: (request, expected codes, targets it addresses) -----------


def _model_of(drawn_id: Drawn, draw) -> str:
    return drawn_id.model or draw(st.sampled_from(sorted(MODELS)))


@st.composite
def step_requests(draw, numbers: dict[str, int] | None = None):
    """Steps; numbered ones too when `numbers` gives each target's step number."""
    session = draw(session_ids())
    spec = MODELS[_model_of(session, draw)]
    inputs = draw(inputs_for(spec))
    request = pb.StepRequest(session_id=session.value, inputs=inputs.value)
    request.reset = draw(st.booleans())
    request.return_state = draw(st.booleans())
    parts = [session, inputs]
    if numbers is not None:
        number = draw(step_numbers(numbers.get(session.value, 0)))
        request.step_number = number.value
        parts.append(number)
    if draw(st.booleans()):
        state = draw(states_for(spec))
        request.state.CopyFrom(state.value)
        parts.append(state)
        if request.reset:
            parts.append(Drawn(None, frozenset({INVALID})))
    return request, expected_codes(*parts), {session.value}


@st.composite
def step_many_requests(draw):
    ids = draw(st.one_of(st.lists(session_ids(), max_size=5), coherent_ids()))
    parts = list(ids)
    models = {i.model for i in ids if i.model}
    values = [i.value for i in ids]
    if not ids or len(set(values)) < len(values) or len(models) > 1:
        parts.append(Drawn(None, frozenset({INVALID})))
    spec = MODELS[
        sorted(models)[0] if models else draw(st.sampled_from(sorted(MODELS)))
    ]
    rows = len(ids) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    if rows != len(ids):
        parts.append(Drawn(None, frozenset({INVALID})))
    inputs = draw(inputs_for(spec, lead=(max(rows, 0),)))
    request = pb.StepManyRequest(
        session_ids=values,
        inputs=inputs.value,
        reset=draw(st.booleans()),
        return_state=draw(st.booleans()),
    )
    return request, expected_codes(*parts, inputs), set(values)


@st.composite
def step_numbers(draw, current: int) -> Drawn:
    """A step number for a session whose last step was `current`: none, the
    next, a repeat (answered from the kept reply if that step was numbered,
    else refused), one out of order, or a negative one."""
    kind = draw(st.sampled_from(["none", "next", "next", "repeat", "other"]))
    if kind == "none":
        return Drawn(0)
    if kind == "next":
        return Drawn(current + 1)
    if kind == "repeat" and current:
        return Drawn(current, frozenset({StatusCode.OK, ABORTED}))
    if draw(st.booleans()):  # malformed, whatever the session's number
        return Drawn(draw(st.sampled_from([-1, -(2**63)])), frozenset({INVALID}))
    others = [current + 2, current - 1, 2**63 - 1, 2**62]
    wrong = draw(st.sampled_from([n for n in others if n > 0 and n != current + 1]))
    return Drawn(wrong, frozenset({ABORTED}))


def coherent_ids():
    """Distinct targets of one model: a StepMany that may well be valid."""
    return st.sampled_from(sorted(MODELS)).flatmap(
        lambda model: st.permutations(
            [Drawn(target_id(model, i), model=model) for i in range(TARGETS_PER_MODEL)]
        ).flatmap(lambda ids: st.integers(1, len(ids)).map(lambda n: ids[:n]))
    )


@st.composite
def start_requests(draw):
    others = st.sampled_from(["", "no_such_model"]) | long_texts()
    model = draw(st.sampled_from(sorted(MODELS)) | others)
    model_problem = frozenset(
        {} if model in MODELS else {INVALID if not model else NOT_FOUND}
    )
    session = draw(session_ids())
    id_problems = session.problems
    if session.model:
        id_problems = frozenset({ALREADY_EXISTS})  # a live target
    elif NOT_FOUND in id_problems or not session.value:
        id_problems = frozenset()  # a free id, or none: the server mints one
    request = pb.StartSessionRequest(model=model, session_id=session.value)
    parts = [Drawn(None, model_problem), Drawn(None, id_problems)]
    if draw(st.booleans()):
        state = draw(states_for(MODELS.get(model, MODELS["gru"])))
        request.initial_state.CopyFrom(state.value)
        parts.append(state)
    return request, expected_codes(*parts), set()


@st.composite
def state_requests(draw, method: str):
    session = draw(session_ids())
    parts = [session]
    kind = {"Reset": pb.ResetRequest, "SetState": pb.SetStateRequest}[method]
    request = kind(session_id=session.value)
    if draw(st.booleans()):
        state = draw(states_for(MODELS[_model_of(session, draw)]))
        request.state.CopyFrom(state.value)
        parts.append(state)
    elif method == "SetState":
        parts.append(Drawn(None, frozenset({INVALID})))  # a state is required
    return request, expected_codes(*parts), {session.value}


ID_ONLY = {
    "GetState": pb.GetStateRequest,
    "EndSession": pb.EndSessionRequest,
    "ExportSession": pb.ExportSessionRequest,
    "DescribeSession": admin_pb.DescribeSessionRequest,
    "EvictSession": admin_pb.EvictSessionRequest,
}


@st.composite
def id_only_requests(draw, method: str):
    session = draw(session_ids())
    request = ID_ONLY[method](session_id=session.value)
    return request, expected_codes(session), {session.value}


@st.composite
def list_sessions_requests(draw):
    model = draw(st.sampled_from(["", *sorted(MODELS), "no_such_model"]))
    size = draw(st.sampled_from([0, 1, 3, 1000, 1001, -1, 2**31 - 1, -(2**31)]))
    token = draw(st.text(max_size=30) | st.sampled_from(["target-", "~"]))
    request = admin_pb.ListSessionsRequest(
        model=model, page_size=size, page_token=token
    )
    problems = {NOT_FOUND} if model == "no_such_model" else set()
    if not 0 <= size <= 1000:
        problems.add(INVALID)
    return request, expected_codes(Drawn(None, frozenset(problems))), set()


@st.composite
def evict_sessions_requests(draw):
    """Never a valid one: that would end the canary."""
    model = draw(st.sampled_from(["", "no_such_model"]) | long_texts())
    all_models = draw(st.booleans()) if model else False
    expected = INVALID if all_models or not model else NOT_FOUND
    request = admin_pb.EvictSessionsRequest(model=model, all_models=all_models)
    return request, frozenset({expected}), set()


# The tests -------------------------------------------------------------------


def run_unary(world: FuzzWorld, method: str, drawn) -> None:
    request, expected, addressed = drawn
    code, reply = world.call(method, request)
    assert_code(code, expected)
    if method == "StartSession" and code == StatusCode.OK:
        world.end_started(reply)
    world.check(addressed if code == StatusCode.OK else set())


@fuzz_settings(500)
@given(data=st.data())
def test_step(world, data):
    request, expected, addressed = data.draw(step_requests(world.step_numbers()))
    code, _ = world.call("Step", request)
    assert_code(code, expected)
    repeat = request.step_number and request.step_number == world.step_numbers().get(
        request.session_id
    )
    # A repeat answered from the kept reply must not touch the state.
    world.check(addressed if code == StatusCode.OK and not repeat else set())


@fuzz_settings(400)
@given(drawn=step_many_requests())
def test_step_many(world, drawn):
    run_unary(world, "StepMany", drawn)


@fuzz_settings(250)
@given(drawn=start_requests())
def test_start_session(world, drawn):
    run_unary(world, "StartSession", drawn)


@fuzz_settings(200)
@given(
    method=st.sampled_from(["Reset", "SetState"]),
    data=st.data(),
)
def test_reset_and_set_state(world, method, data):
    run_unary(world, method, data.draw(state_requests(method)))


@fuzz_settings(150)
@given(method=st.sampled_from(["GetState", "EndSession"]), data=st.data())
def test_get_state_and_end_session(world, method, data):
    run_unary(world, method, data.draw(id_only_requests(method)))


@fuzz_settings(100)
@given(data=st.data())
def test_export_session(world, data):
    request, expected, _ = data.draw(id_only_requests("ExportSession"))
    code, reply = world.call("ExportSession", request)
    assert_code(code, expected)
    if code == StatusCode.OK:  # of a live target: importing it again is refused
        again = pb.ImportSessionRequest(session=reply.session)
        assert world.call("ImportSession", again)[0] == ALREADY_EXISTS
    world.check()


@fuzz_settings(400)
@given(data=st.data())
def test_import_session(world, data):
    drawn = data.draw(import_bytes(world.export))
    request = pb.ImportSessionRequest(session=drawn.value)
    code, reply = world.call("ImportSession", request)
    assert_code(code, expected_codes(drawn))
    if code == StatusCode.OK:
        world.check_imported(reply, exact=drawn.value == world.export)
    world.check()


@fuzz_settings(150)
@given(
    method=st.sampled_from(["DescribeSession", "EvictSession", "ListSessions"]),
    data=st.data(),
)
def test_admin(world, method, data):
    if method == "ListSessions":
        request, expected, _ = data.draw(list_sessions_requests())
        code, reply = world.call(method, request)
        assert_code(code, expected)
        if code == StatusCode.OK:
            ids = [s.session_id for s in reply.sessions]
            assert ids == sorted(ids) and reply.total >= len(ids)
            assert all(i > request.page_token for i in ids)
        world.check()
    else:
        run_unary(world, method, data.draw(id_only_requests(method)))


@fuzz_settings(30)
@given(drawn=evict_sessions_requests())
def test_evict_sessions(world, drawn):
    run_unary(world, "EvictSessions", drawn)


@fuzz_settings(10)
@given(st.just(None))
def test_list_models(world, _):
    code, reply = world.call("ListModels", pb.ListModelsRequest())
    assert code == StatusCode.OK
    assert sorted(m.name for m in reply.models) == sorted(MODELS)
    world.check()


@fuzz_settings(200)
@given(items=st.lists(step_requests(), min_size=1, max_size=6))
def test_step_stream(world, items):
    requests = [request for request, _, _ in items]
    for request in requests:
        request.return_state = True
    world.sent["StepStream"] += len(requests)
    replies = list(world.stub.StepStream(iter(requests), timeout=30))

    assert len(replies) == len(items)
    last_accepted = {}
    for (request, expected, _), reply in zip(items, replies):
        world.codes[_code(reply.error.code).name] += 1
        if reply.HasField("response"):
            assert_code(StatusCode.OK, expected)
            last_accepted[request.session_id] = reply.response
        else:
            assert_code(_code(reply.error.code), expected)
    for session_id, response in last_accepted.items():
        world.expect_state(session_id, response)
    world.check(set(last_accepted))


def _code(value: int) -> StatusCode:
    return next(c for c in StatusCode if c.value[0] == value)


# Regressions: what fuzzing found, kept as fixed cases ------------------------

LSTM_H = np.zeros(5, np.float32)


def _long_state(layer: str, part: str) -> pb.State:
    return state((layer, part, LSTM_H), ("lstm", "c", LSTM_H))


# Each failed with RESOURCE_EXHAUSTED ("received metadata size exceeds hard
# limit"): the error message echoed the long value past gRPC's metadata limit.
# The shapes of over 4300 digits' worth of bytes failed with INTERNAL, as
# Python refused to print the byte count.
REGRESSIONS = {
    "long model name": (
        "StartSession",
        pb.StartSessionRequest(model="m" * 100_000),
        NOT_FOUND,
    ),
    "long non-ASCII model name": (
        "StartSession",
        pb.StartSessionRequest(model="\u6f22" * 3_000),
        NOT_FOUND,
    ),
    "20000 dimensions of 1": (
        "Step",
        pb.StepRequest(
            session_id=target_id("lstm"),
            inputs=raw_tensor(F32, [1] * 20_000, b"\0" * 4),
        ),
        INVALID,
    ),
    "20000 dimensions of 2": (
        "Step",
        pb.StepRequest(
            session_id=target_id("lstm"), inputs=raw_tensor(F32, [2] * 20_000, b"")
        ),
        INVALID,
    ),
    "long layer name": (
        "SetState",
        pb.SetStateRequest(
            session_id=target_id("lstm"), state=_long_state("L" * 10**5, "h")
        ),
        INVALID,
    ),
    "long part name": (
        "Reset",
        pb.ResetRequest(
            session_id=target_id("lstm"), state=_long_state("lstm", "p" * 10**5)
        ),
        INVALID,
    ),
}


@pytest.mark.parametrize("case", REGRESSIONS.values(), ids=list(REGRESSIONS))
def test_regression(world, case):
    method, request, expected = case
    code, _ = world.call(method, request)
    assert code == expected
    world.check()


def test_regression_in_a_stream(world):
    request = REGRESSIONS["20000 dimensions of 2"][1]
    (reply,) = world.stub.StepStream(iter([request]), timeout=30)
    assert reply.error.code == INVALID.value[0]
    world.check()
