"""Unit tests of the session registry and the state store, without gRPC."""

import re
import types

import numpy as np
import pytest

from seqserve.server import sessions as sessions_module
from seqserve.server.device_state import TensorFlowStateStore
from seqserve.server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from seqserve.server.sessions import SessionRegistry
from seqserve.server.state_store import StateStore


def started(registry: SessionRegistry, session_id: str = "", model: str = "m"):
    session = registry.add(model, session_id)
    registry.activate(session)
    return session


def test_a_session_is_invisible_until_activated():
    registry = SessionRegistry(max_sessions=4)
    session = registry.add("m", "early")
    with pytest.raises(NotFound):
        registry.get("early")
    with pytest.raises(NotFound):
        registry.remove("early", "ended")
    with pytest.raises(AlreadyExists):
        registry.add("m", "early")

    registry.activate(session)
    assert registry.get("early") is session


def test_a_discarded_start_leaves_no_trace():
    registry = SessionRegistry(max_sessions=1)
    registry.discard(registry.add("m", "failed"))
    assert len(registry) == 0
    with pytest.raises(NotFound, match="unknown"):
        registry.get("failed")
    assert started(registry, "failed").id == "failed"


def test_minted_ids_are_long_distinct_and_well_formed():
    registry = SessionRegistry(max_sessions=1000)
    ids = [started(registry).id for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) >= 24 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


def test_limit_counts_live_sessions_and_frees_on_remove():
    registry = SessionRegistry(max_sessions=2)
    first = started(registry, "a")
    started(registry, "b")
    with pytest.raises(ResourceExhausted):
        registry.add("m", "c")
    # A duplicate is refused as such even when the registry is full.
    with pytest.raises(AlreadyExists):
        registry.add("m", "a")

    registry.remove(first.id, "was ended by the client")
    assert started(registry, "c").id == "c"


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "\u00e9"])
def test_get_and_remove_refuse_missing_or_malformed_ids(bad):
    registry = SessionRegistry(max_sessions=1)
    with pytest.raises(InvalidArgument):
        registry.get(bad)
    with pytest.raises(InvalidArgument):
        registry.remove(bad, "ended")


def test_missing_sessions_say_why(monkeypatch):
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(sessions_module, "time", fake_time)
    registry = SessionRegistry(max_sessions=4)
    ended = started(registry, "ended")
    registry.remove(ended.id, sessions_module.ENDED_BY_CLIENT)
    idle = started(registry, "idle")
    clock[0] += 5
    busy = started(registry, "busy")
    clock[0] += 5  # "idle" last used 10 s ago, "busy" 5 s ago

    assert registry.remove_idle(idle_timeout_s=7) == [idle]
    assert registry.get("busy") is busy
    messages = {}
    for session_id in ("ended", "idle", "never"):
        with pytest.raises(NotFound) as caught:
            registry.get(session_id)
        messages[session_id] = str(caught.value)
    assert "ended by the client" in messages["ended"]
    assert "expired" in messages["idle"]
    assert "unknown" in messages["never"]
    assert idle.end_reason and ended.end_reason


# Host arrays, and TensorFlow variables (on the GPU when there is one; here on
# the CPU, which runs the same code).
stores = pytest.mark.parametrize("store_type", [StateStore, TensorFlowStateStore])


@stores
def test_store_grows_keeping_rows_and_flags(store_type):
    store = store_type(units=(3, 2), recurrent_layers=1, capacity=2)
    slots = [store.allocate() for _ in range(2)]
    for slot in slots:
        state = [np.full(3, slot + 1.0, "f4"), np.full(2, -slot - 1.0, "f4")]
        store.scatter(np.array([slot]), [s[None] for s in state], [np.array([True])])

    grown = [store.allocate() for _ in range(3)]

    assert store.capacity == 8
    assert sorted(slots + grown) == list(range(5))
    for slot in slots:
        h, c = store.read(slot)
        np.testing.assert_array_equal(h, np.full(3, slot + 1.0))
        np.testing.assert_array_equal(c, np.full(2, -slot - 1.0))
    _, flags = store.gather(np.array(slots + grown))
    assert np.asarray(flags[0]).tolist() == [True, True, False, False, False]


@stores
def test_store_reuses_freed_slots_and_write_starts_them_over(store_type):
    store = store_type(units=(2,), recurrent_layers=1, capacity=4)
    slots = [store.allocate() for _ in range(4)]
    store.scatter(np.array(slots), [np.ones((4, 2), "f4")], [np.ones(4, bool)])
    store.release(slots[1])

    reused = store.allocate()
    store.write(reused, None)

    assert reused == slots[1] and store.capacity == 4
    states, flags = store.gather(np.array(slots))
    np.testing.assert_array_equal(states[0][:, 0], [1, 0, 1, 1])
    assert np.asarray(flags[0]).tolist() == [True, False, True, True]


@stores
def test_store_read_is_a_copy_and_release_refuses_bad_slots(store_type):
    store = store_type(units=(2,), recurrent_layers=1, capacity=2)
    slot = store.allocate()
    store.write(slot, [np.array([1.0, 2.0], "f4")])
    store.read(slot)[0][:] = 9
    np.testing.assert_array_equal(store.read(slot)[0], [1.0, 2.0])
    for bad in (-1, 2):
        with pytest.raises(ValueError):
            store.release(bad)
