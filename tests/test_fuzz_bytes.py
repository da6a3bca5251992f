"""Fuzzing the serialized bytes of every request, against one real server.

Below the message level: random bytes, and valid requests truncated, with
bytes flipped or inserted, or with a string field of invalid UTF-8 added. A
payload that does not parse as the method's request must be INVALID_ARGUMENT
(gRPC alone answers INTERNAL); one that parses gets one of the codes its RPC
can give. The checks after each example are those of test_fuzz.py. Sized by
FUZZ_SCALE as there.
"""

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc import StatusCode
from hypothesis import given
from hypothesis import strategies as st

from seqserve.v1 import seqserve_pb2 as pb

from fuzz_requests import target_id, target_ids
from fuzz_world import SERVICE, fuzz_settings, fuzz_world
from rpc_helpers import TIMEOUT_S, state, tensor

pytestmark = pytest.mark.slow

INVALID = StatusCode.INVALID_ARGUMENT
ANSWERS = {StatusCode.OK, INVALID, StatusCode.NOT_FOUND, StatusCode.ALREADY_EXISTS}
BAD_UTF8 = b"\xff\xfe\xc3("  # not UTF-8: proto3 refuses it in a string field


def seeds() -> dict[str, object]:
    """A valid request of every unary method, to mutate."""
    lstm, gru = target_id("lstm"), [target_id("gru", i) for i in (0, 1)]
    zeros = np.zeros(5, np.float32)
    frames = np.array([[0.5, 1, -1]] * 2, np.float32)
    parts = state(("lstm", "h", zeros), ("lstm", "c", zeros))
    return {
        "ListModels": pb.ListModelsRequest(),
        "StartSession": pb.StartSessionRequest(model="gru"),
        "Step": pb.StepRequest(session_id=lstm, inputs=tensor(frames)),
        "StepMany": pb.StepManyRequest(session_ids=gru, inputs=tensor(frames[:, None])),
        "Reset": pb.ResetRequest(session_id=lstm),
        "GetState": pb.GetStateRequest(session_id=lstm),
        "SetState": pb.SetStateRequest(session_id=lstm, state=parts),
        "EndSession": pb.EndSessionRequest(session_id=target_id("tokens")),
    }


SEEDS = seeds()
REQUEST_TYPES = {name: type(message) for name, message in SEEDS.items()}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    at = draw(st.integers(0, len(seed)))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "bad utf-8"]))
    if how == "truncate":
        return seed[:at]
    if how == "flip" and seed:
        at = min(at, len(seed) - 1)
        return (
            seed[:at] + bytes([seed[at] ^ draw(st.integers(1, 255))]) + seed[at + 1 :]
        )
    if how == "insert":
        return seed[:at] + draw(st.binary(min_size=1, max_size=8)) + seed[at:]
    field = draw(st.integers(1, 5))  # a length-delimited field, 1 to 5
    return seed + bytes([field << 3 | 2, len(BAD_UTF8)]) + BAD_UTF8


def payloads(method: str):
    seed = SEEDS[method].SerializeToString()
    return st.one_of(st.binary(max_size=200), mutated(seed), st.just(seed))


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    with fuzz_world(tmp_path_factory.mktemp("fuzz-bytes"), request.config) as world:
        yield world


def parsed(method: str, payload: bytes):
    try:
        return REQUEST_TYPES[method].FromString(payload)
    except DecodeError:
        return None


def addressed(request) -> set[str]:
    ids = set(getattr(request, "session_ids", ()))
    return ids | {getattr(request, "session_id", "")}


@fuzz_settings(600)
@given(method=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_unary_payloads(world, method, data):
    payload = data.draw(payloads(method))
    request = parsed(method, payload)

    code, reply = world.call_raw(method, payload)

    assert code == INVALID if request is None else code in ANSWERS, code
    if code == StatusCode.OK and method == "StartSession":
        world.end_started(pb.StartSessionResponse.FromString(reply))
    world.check(addressed(request) if code == StatusCode.OK else set())


@fuzz_settings(120)
@given(st.lists(payloads("Step"), min_size=1, max_size=6))
def test_stream_payloads(world, items):
    call = world.channel.stream_stream(SERVICE + "StepStream")
    world.sent["StepStream"] += len(items)
    replies = [pb.StepOutcome.FromString(r) for r in call(iter(items), timeout=30)]

    assert len(replies) == len(items)
    changed = set()
    for payload, reply in zip(items, replies):
        world.codes[StatusCode(_status(reply.error.code)).name] += 1
        request = parsed("Step", payload)
        if reply.HasField("response"):
            changed |= addressed(request)
        elif request is None:
            assert reply.error.code == INVALID.value[0]
        else:
            assert reply.error.code in {c.value[0] for c in ANSWERS}
    world.check(changed & set(target_ids()))


# Found by test_unary_payloads: gRPC answered INTERNAL ("Exception deserializing
# request!") for bytes that do not parse, here field 1 (a string in every request
# but ListModels', which has no fields) of invalid UTF-8.
UNPARSABLE = b"\x0a" + bytes([len(BAD_UTF8)]) + BAD_UTF8


@pytest.mark.parametrize("method", sorted(set(SEEDS) - {"ListModels"}))
def test_unparsable_request_is_invalid_argument(world, method):
    call = world.channel.unary_unary(SERVICE + method)
    with pytest.raises(grpc.RpcError) as refused:
        call(UNPARSABLE, timeout=TIMEOUT_S)
    assert refused.value.code() == INVALID
    world.check()


def test_unparsable_stream_item_is_refused_alone(world):
    call = world.channel.stream_stream(SERVICE + "StepStream")
    valid = SEEDS["Step"].SerializeToString()
    replies = [
        pb.StepOutcome.FromString(r)
        for r in call(iter([UNPARSABLE, valid]), timeout=TIMEOUT_S)
    ]
    assert replies[0].error.code == INVALID.value[0]
    assert replies[1].HasField("response")
    world.check({SEEDS["Step"].session_id})


def _status(value: int):
    return next(c.value for c in StatusCode if c.value[0] == value)
