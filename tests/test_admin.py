"""The admin service lists, describes and evicts sessions; LRU eviction when full."""

import time

import grpc
import numpy as np
import pytest

from seqserve.client import NotFoundError
from seqserve.server.sessions import (
    EVICTED_BY_OPERATOR,
    EVICTED_FOR_ROOM,
    SessionRegistry,
)
from seqserve.v1 import admin_pb2 as pb

from admin_helpers import TIMEOUT_S, admin_for, scrape
from conftest import client_for, running_server
from rpc_helpers import status_of
from small_models import embedding_model, frames, lstm_model, save_models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    models = {"lstm": lstm_model(), "tokens": embedding_model()}
    return save_models(tmp_path_factory.mktemp("admin"), models)


@pytest.fixture(scope="module")
def app(model_dir):
    settings = {"max_sessions": 4, "when_full": "evict-lru", "metrics_port": 0}
    with running_server(model_dir, **settings) as app:
        yield app


@pytest.fixture
def stubs(app):
    with client_for(app) as client, admin_for(app) as admin:
        yield client, admin
        admin.EvictSessions(pb.EvictSessionsRequest(all_models=True))


def list_ids(admin, **request) -> list[str]:
    reply = admin.ListSessions(pb.ListSessionsRequest(**request), timeout=TIMEOUT_S)
    return [s.session_id for s in reply.sessions]


def test_describe_reports_model_times_and_counts(stubs):
    client, admin = stubs
    before = time.time()
    session = client.start_session("lstm", session_id="described")
    request = pb.DescribeSessionRequest(session_id="described")
    fresh = admin.DescribeSession(request, timeout=TIMEOUT_S).session
    assert (fresh.model, fresh.version, fresh.steps, fresh.timesteps) == (
        "lstm",
        1,
        0,
        0,
    )
    assert not fresh.HasField("last_step")
    rng = np.random.default_rng(0)
    session.step(frames(rng, 3))
    session.step(frames(rng, 2))
    info = admin.DescribeSession(request, timeout=TIMEOUT_S).session
    assert (info.steps, info.timesteps) == (2, 5)
    created = info.created.ToNanoseconds() / 1e9
    last_step = info.last_step.ToNanoseconds() / 1e9
    assert before - 1 <= created <= last_step <= time.time() + 1


def test_list_filters_by_model_and_pages_in_id_order(stubs):
    client, admin = stubs
    for name in ("c", "a", "d"):
        client.start_session("lstm", session_id=name)
    client.start_session("tokens", session_id="b")
    assert list_ids(admin) == ["a", "b", "c", "d"]
    assert list_ids(admin, model="lstm") == ["a", "c", "d"]
    first = admin.ListSessions(pb.ListSessionsRequest(page_size=3), timeout=TIMEOUT_S)
    assert ([s.session_id for s in first.sessions], first.total) == (["a", "b", "c"], 4)
    assert first.next_page_token == "c"
    rest = pb.ListSessionsRequest(page_size=3, page_token=first.next_page_token)
    last = admin.ListSessions(rest, timeout=TIMEOUT_S)
    assert ([s.session_id for s in last.sessions], last.next_page_token) == (["d"], "")


def test_evicted_session_calls_get_not_found_saying_so(stubs):
    client, admin = stubs
    session = client.start_session("lstm", session_id="evicted")
    session.step(frames(np.random.default_rng(1), 4))
    reply = admin.EvictSession(pb.EvictSessionRequest(session_id="evicted"))
    assert reply.timesteps == 4
    with pytest.raises(NotFoundError) as caught:
        session.step(frames(np.random.default_rng(1), 1))
    assert "evicted by an operator" in caught.value.details
    again = pb.EvictSessionRequest(session_id="evicted")
    assert status_of(admin.EvictSession, again) == grpc.StatusCode.NOT_FOUND
    describe = pb.DescribeSessionRequest(session_id="evicted")
    assert status_of(admin.DescribeSession, describe) == grpc.StatusCode.NOT_FOUND


def test_evict_sessions_of_one_model_or_all_when_asked(stubs):
    client, admin = stubs
    kept = client.start_session("tokens", session_id="kept")
    for name in ("x", "y"):
        client.start_session("lstm", session_id=name)
    reply = admin.EvictSessions(pb.EvictSessionsRequest(model="lstm"))
    assert (reply.evicted, list_ids(admin)) == (2, ["kept"])
    kept.step(np.array([1, 2], np.int32))
    for bad in (
        pb.EvictSessionsRequest(),
        pb.EvictSessionsRequest(model="lstm", all_models=True),
    ):
        assert status_of(admin.EvictSessions, bad) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.EvictSessionsRequest(model="nope")
    assert status_of(admin.EvictSessions, unknown) == grpc.StatusCode.NOT_FOUND
    reply = admin.EvictSessions(pb.EvictSessionsRequest(all_models=True))
    assert (reply.evicted, list_ids(admin)) == (1, [])


@pytest.mark.parametrize("page_size", [-1, 1001])
def test_list_refuses_a_page_size_out_of_bounds(stubs, page_size):
    _, admin = stubs
    request = pb.ListSessionsRequest(page_size=page_size)
    assert status_of(admin.ListSessions, request) == grpc.StatusCode.INVALID_ARGUMENT


def test_full_server_evicts_the_least_recently_used_session(app, stubs):
    client, admin = stubs
    evicted = (
        "seqserve_sessions_ended_total",
        (("model", "lstm"), ("reason", "evicted")),
    )
    before = scrape(app)[evicted]
    rng = np.random.default_rng(2)
    sessions = [client.start_session("lstm", session_id=f"s{i}") for i in range(4)]
    sessions[0].step(frames(rng, 1))  # s1 is now the least recently used
    newcomer = client.start_session("lstm", session_id="new")
    assert list_ids(admin) == ["new", "s0", "s2", "s3"]
    with pytest.raises(NotFoundError) as caught:
        sessions[1].step(frames(rng, 1))
    assert "least recently used" in caught.value.details
    assert scrape(app)[evicted] == before + 1
    newcomer.step(frames(rng, 1))
    sessions[2].get_state()  # any call counts as use: s3 goes next
    client.start_session("tokens", session_id="newer")
    assert list_ids(admin) == ["new", "newer", "s0", "s2"]


def started(registry: SessionRegistry, model: str, session_id: str):
    session = registry.add(model, session_id)
    registry.activate(session)
    return session


def test_registry_orders_by_last_use_and_skips_sessions_still_starting():
    registry = SessionRegistry(max_sessions=4)
    registry.add("m", "starting")  # reserved, never activated
    for name in ("a", "b", "c"):
        started(registry, "m" if name != "c" else "n", name)
    registry.get("a")
    registry.get_many(["b"])
    gone = registry.remove_least_recent(EVICTED_FOR_ROOM)
    assert gone.id == "c" and gone.end_reason == EVICTED_FOR_ROOM
    assert registry.count_by_model() == {"m": 2}
    assert [s.id for s in registry.remove_all("m", EVICTED_BY_OPERATOR)] == ["a", "b"]
    assert registry.remove_least_recent(EVICTED_FOR_ROOM) is None
    assert len(registry) == 1  # only the one still starting
