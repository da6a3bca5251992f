"""Snapshots, restore at start, and export/import of one session, in process.

Crash and SIGTERM against real server processes are in test_durability.py.
"""

import json
import logging
import types

import grpc
import keras
import numpy as np
import pytest

from seqserve.client import (
    AlreadyExistsError,
    Client,
    InvalidArgumentError,
    PermissionDeniedError,
)
from seqserve.client.tensors import to_numpy
from seqserve.server import snapshots
from seqserve.server.app import App
from seqserve.server.config import Config
from seqserve.server.executor import StepResult
from seqserve.server.snapshot_format import (
    Capture,
    SnapshotRefused,
    decode,
    encode,
)
from seqserve.v1 import admin_pb2 as admin_pb
from seqserve.v1 import seqserve_pb2 as pb

from admin_helpers import admin_for, scrape
from conftest import running_server
from fuzz_exports import pack, split
from rpc_helpers import status_of, stub_for, tensor
from small_models import (
    FEATURES,
    assert_matches_offline,
    frames,
    lstm_model,
    offline_outputs,
    save_models,
)

STARTED_RESTORED = (
    "seqserve_sessions_started_total",
    (("model", "lstm"), ("reason", "restored")),
)
LAYOUT = {
    "model": "m",
    "version": 1,
    "state": [["r", "LSTM", "h", 3], ["r", "LSTM", "c", 3]],
    "recurrent_layers": 1,
}


def capture(sessions: int) -> Capture:
    """Sessions s0, s1, ... with random numbers and states; odd rows keep a reply."""
    rng = np.random.default_rng(sessions)
    return Capture(
        ids=[f"s{i}" for i in range(sessions)],
        owners=[None if i % 2 else f"owner{i}" for i in range(sessions)],
        clients=[f"client{i}" for i in range(sessions)],
        versions=[1] * sessions,
        step_numbers=list(range(2, sessions + 2)),
        timesteps=[7 * i for i in range(sessions)],
        created_wall_s=1.7e9 + rng.random(sessions),
        last_used_wall_s=1.8e9 + rng.random(sessions),
        states=[rng.standard_normal((sessions, 3)).astype("f4") for _ in range(2)],
        has_output=rng.random((sessions, 1)) < 0.5,
        replies={
            i: StepResult([rng.standard_normal((2, 4)).astype("f4")], None, 7, i + 2)
            for i in range(1, sessions, 2)
        },
    )


def test_a_snapshot_reads_back_as_written():
    written = capture(5)
    found, records = decode(encode(LAYOUT, written))

    assert found == LAYOUT
    assert [r.id for r in records] == written.ids
    assert [(r.owner, r.client) for r in records] == list(
        zip(written.owners, written.clients)
    )
    for row, record in enumerate(records):
        np.testing.assert_array_equal(record.state, [p[row] for p in written.states])
        assert record.has_output == written.has_output[row].tolist()
        assert (record.step_number, record.timesteps) == (
            written.step_numbers[row],
            written.timesteps[row],
        )
        assert record.last_used_wall_s == written.last_used_wall_s[row]
        if row in written.replies:
            np.testing.assert_array_equal(
                record.last_reply.outputs, written.replies[row].outputs
            )
            assert record.last_reply.step_number == written.replies[row].step_number
        else:
            assert record.last_reply is None


def test_truncated_or_damaged_bytes_are_refused():
    data = encode(LAYOUT, capture(3))
    rng = np.random.default_rng(0)
    for cut in [0, 8, 41, *rng.integers(1, len(data), 60), len(data) - 1]:
        with pytest.raises(SnapshotRefused):
            decode(data[:cut])
    for index in rng.integers(0, len(data), 30):
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        with pytest.raises(SnapshotRefused):
            decode(bytes(damaged))


def _set(path: tuple, value):
    def change(header: dict) -> None:
        *parents, last = path
        for key in parents:
            header = header[key]
        header[last] = value

    return change


# Of the kinds that fuzzing ImportSession found accepted, or failing late with
# an unexpected error, before the parser checked each field (each case is
# checksummed again, so it reaches the parser).
HEADER_CASES = {
    "format true": _set(("format",), True),
    "format a string": _set(("format",), "1"),
    "layout a list": _set(("layout",), []),
    "ids not texts": _set(("ids",), [1, 2, 3]),
    "one owner short": lambda h: h["owners"].pop(),
    "a client not a text": _set(("clients", 0), 5),
    "a column missing": lambda h: h["columns"].pop("timesteps"),
    "a reply row twice": lambda h: h["replies"].append(h["replies"][0]),
    "a reply row out of range": _set(("replies", 0, 0), 99),
    "a reply row true": _set(("replies", 0, 0), True),
    "reply step number negative": _set(("replies", 0, 1, "step_number"), -1),
    "reply timesteps a float": _set(("replies", 0, 1, "timesteps"), 7.0),
}


@pytest.mark.parametrize("change", HEADER_CASES.values(), ids=list(HEADER_CASES))
def test_a_malformed_header_is_refused(change):
    data = encode(LAYOUT, capture(3))
    header, arrays = split(data)
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    with pytest.raises(SnapshotRefused):
        decode(pack(data[:8], text, arrays))


def test_a_column_with_an_impossible_value_is_refused():
    """Step numbers, timesteps and times are checked as numbers, not only as
    columns: a negative count or a time that is not finite is refused."""
    good = capture(3)
    for name, value in (
        ("step_numbers", -1),
        ("timesteps", -5),
        ("created_wall_s", float("nan")),
        ("last_used_wall_s", float("inf")),
    ):
        bad = capture(3)
        getattr(bad, name)[1] = value  # a list or an array
        with pytest.raises(SnapshotRefused):
            decode(encode(LAYOUT, bad))
    assert len(decode(encode(LAYOUT, good))[1]) == 3


@pytest.fixture(scope="module")
def keras_lstm():
    return lstm_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, keras_lstm):
    return save_models(tmp_path_factory.mktemp("snap-models"), {"lstm": keras_lstm})


@pytest.fixture(scope="module")
def retrained_dir(tmp_path_factory):
    """The same name and layout with other weights: a model that changed."""
    return save_models(tmp_path_factory.mktemp("retrained"), {"lstm": lstm_model(9)})


def client_of(app) -> Client:
    return Client(f"127.0.0.1:{app.port}")


@pytest.mark.parametrize("storage", ["host", "tensorflow"])
def test_sessions_survive_a_stop_and_start(model_dir, keras_lstm, tmp_path, storage):
    sequence = frames(np.random.default_rng(1), 12)
    chunks = np.split(sequence, 4)
    settings = {"snapshot_dir": str(tmp_path), "state_storage": storage}
    with running_server(model_dir, **settings) as app:
        with client_of(app) as client:
            session = client.start_session("lstm", session_id="kept")
            streamed = [session.step(c) for c in chunks[:2]]
            ended = client.start_session("lstm")
            ended.close()
    assert (tmp_path / "lstm@1.snapshot").exists()

    with running_server(model_dir, metrics_port=0, **settings) as app:
        restored = scrape(app)[STARTED_RESTORED]
        with client_of(app) as client, stub_for(app) as stub:
            # The last numbered step's reply survived: a repeat returns it.
            repeat = stub.Step(
                pb.StepRequest(
                    session_id="kept", inputs=tensor(chunks[1]), step_number=2
                )
            )
            session = client.attach("kept", "lstm")
            streamed += [session.step(c) for c in chunks[2:]]
            state = session.get_state()
            gone = status_of(stub.GetState, pb.GetStateRequest(session_id=ended.id))

    assert restored == 1
    assert gone == grpc.StatusCode.NOT_FOUND  # an ended session stays ended
    np.testing.assert_array_equal(to_numpy(repeat.outputs[0]), streamed[1])
    assert session.step_number == 4
    assert_matches_offline(keras_lstm, sequence, streamed, state)


def test_a_truncated_snapshot_is_refused_and_the_server_starts(
    model_dir, tmp_path, caplog
):
    with running_server(model_dir, snapshot_dir=str(tmp_path)) as app:
        with client_of(app) as client:
            for _ in range(3):
                client.start_session("lstm").step(np.ones((2, 3), np.float32))
    whole = (tmp_path / "lstm@1.snapshot").read_bytes()
    rng = np.random.default_rng(2)
    for cut in rng.integers(1, len(whole), 4):
        (tmp_path / "lstm@1.snapshot").write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="seqserve.server.snapshots"):
            with running_server(model_dir, snapshot_dir=str(tmp_path)) as app:
                assert len(app.core.sessions) == 0
                with client_of(app) as client:
                    assert client.list_models()[0].name == "lstm"
        refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(refusals) == 1
        assert list(tmp_path.glob("lstm@1.snapshot.refused-*"))


def test_a_snapshot_of_a_changed_model_is_refused(
    model_dir, retrained_dir, tmp_path, caplog
):
    with running_server(model_dir, snapshot_dir=str(tmp_path)) as app:
        with client_of(app) as client:
            client.start_session("lstm", session_id="old")
    with caplog.at_level(logging.ERROR, logger="seqserve.server.snapshots"):
        with running_server(retrained_dir, snapshot_dir=str(tmp_path)) as app:
            assert len(app.core.sessions) == 0
    assert [r.levelno for r in caplog.records if r.levelno >= logging.ERROR] == [
        logging.ERROR
    ]


def watch_model(units: int) -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, FEATURES), name="frames")
    sequence = keras.layers.LSTM(units, return_sequences=True, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(sequence))


def test_a_snapshot_of_a_model_whose_shape_changed_is_refused(tmp_path, caplog):
    """The same name, LSTM units 4 then 5: the snapshot is set aside whole and
    the server serves the new model."""
    narrow, wide = watch_model(4), watch_model(5)
    for name in ("narrow", "wide"):
        (tmp_path / name).mkdir()
    narrow_dir = save_models(tmp_path / "narrow", {"watch": narrow})
    wide_dir = save_models(tmp_path / "wide", {"watch": wide})
    snapshot_dir = tmp_path / "snap"
    with running_server(narrow_dir, snapshot_dir=str(snapshot_dir)) as app:
        with client_of(app) as client:
            client.start_session("watch").step(np.ones((2, FEATURES), np.float32))
    written = (snapshot_dir / "watch@1.snapshot").read_bytes()
    x = frames(np.random.default_rng(4), 5)
    with caplog.at_level(logging.ERROR, logger="seqserve.server.snapshots"):
        with running_server(wide_dir, snapshot_dir=str(snapshot_dir)) as app:
            restored = len(app.core.sessions)
            with client_of(app) as client:
                (info,) = client.list_models()
                outputs = client.start_session("watch").step(x)

    refusals = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.levelno for r in refusals] == [logging.ERROR]
    assert any("watch" in str(arg) for arg in refusals[0].args)
    (aside,) = snapshot_dir.glob("watch@1.snapshot.refused-*")
    assert aside.read_bytes() == written
    assert restored == 0
    assert [part.units for part in info.state] == [5, 5]
    np.testing.assert_allclose(outputs, offline_outputs(wide, x), atol=1e-5)


def test_refusals_within_one_clock_tick_keep_every_refused_file(tmp_path, monkeypatch):
    frozen = types.SimpleNamespace(time=lambda: 1.7e9, time_ns=lambda: 17 * 10**17)
    monkeypatch.setattr(snapshots, "time", frozen)
    path = tmp_path / "lstm@1.snapshot"
    for garbage in (b"first", b"second"):
        path.write_bytes(garbage)
        assert snapshots.restore_all(None, tmp_path) == 0  # refused before the core

    kept = sorted(p.read_bytes() for p in tmp_path.glob("lstm@1.snapshot.refused-*"))
    assert kept == [b"first", b"second"]
    assert not path.exists()


def test_an_exported_session_continues_exactly_on_another_server(
    model_dir, retrained_dir, keras_lstm
):
    sequence = frames(np.random.default_rng(3), 15)
    chunks = np.split(sequence, 5)
    with (
        running_server(model_dir) as first,
        running_server(model_dir, metrics_port=0) as second,
        running_server(retrained_dir) as changed,
        client_of(first) as one,
        client_of(second) as two,
        client_of(changed) as other,
    ):
        session = one.start_session("lstm")
        streamed = [session.step(c) for c in chunks[:3]]
        exported = one.export_session(session)
        with pytest.raises(AlreadyExistsError):
            one.import_session(exported)
        with pytest.raises(InvalidArgumentError):
            other.import_session(exported)  # other weights under the same name
        with pytest.raises(InvalidArgumentError):
            two.import_session(exported[:-5])
        moved = two.import_session(exported)
        assert (moved.id, moved.step_number, moved.timesteps) == (session.id, 3, 9)
        streamed += [moved.step(c) for c in chunks[3:]]
        state = moved.get_state()
        started = scrape(second)

    assert_matches_offline(keras_lstm, sequence, streamed, state)
    for reason, count in (("new", 0), ("restored", 0), ("imported", 1)):
        key = (STARTED_RESTORED[0], (("model", "lstm"), ("reason", reason)))
        assert started[key] == count, reason


def test_import_refuses_garbage_with_invalid_argument(model_dir):
    with running_server(model_dir) as app, stub_for(app) as stub:
        for garbage in (b"", b"SEQSNAP\x00" + bytes(40), np.ones(99).tobytes()):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ImportSession(pb.ImportSessionRequest(session=garbage), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_snapshot_settings_come_from_flags_and_environment():
    environ = {
        "SEQSERVE_SNAPSHOT_DIR": "/var/snap",
        "SEQSERVE_SNAPSHOT_INTERVAL_S": "5",
    }
    from_env = Config.from_args([], environ)
    from_flags = Config.from_args(["--snapshot-interval-s", "0.5"], environ)

    assert (from_env.snapshot_dir, from_env.snapshot_interval_s) == ("/var/snap", 5.0)
    assert from_flags.snapshot_interval_s == 0.5
    assert Config().snapshot_dir == ""  # off
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(ValueError, match="snapshot_interval_s"):
            Config.from_args(["--snapshot-interval-s", bad], {})


def test_a_restored_session_keeps_its_owner(model_dir, tmp_path):
    alice, bob = "alice-2b7e0c9d41f6", "bob-8d14a6c3e95b"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {alice}\nbob {bob}\n")
    settings = {"snapshot_dir": str(tmp_path / "snap"), "token_file": tokens}
    x = np.ones((2, 3), np.float32)
    with running_server(model_dir, **settings) as app:
        with Client(f"127.0.0.1:{app.port}", token=alice) as client:
            client.start_session("lstm", session_id="alices").step(x)

    with running_server(model_dir, **settings) as app:
        target = f"127.0.0.1:{app.port}"
        with Client(target, token=bob) as intruder:
            with pytest.raises(PermissionDeniedError):
                intruder.attach("alices", "lstm")
        with Client(target, token=alice) as owner:
            session = owner.attach("alices", "lstm")
            session.step(x)
    assert session.step_number == 2


def test_admin_counts_the_steps_of_a_restored_session(model_dir, tmp_path):
    settings = {"snapshot_dir": str(tmp_path)}
    with running_server(model_dir, **settings) as app:
        with client_of(app) as client:
            session = client.start_session("lstm", session_id="counted")
            for _ in range(3):
                session.step(np.ones((2, 3), np.float32))
    with running_server(model_dir, **settings) as app, admin_for(app) as admin:
        request = admin_pb.DescribeSessionRequest(session_id="counted")
        before = admin.DescribeSession(request, timeout=30).session
        with client_of(app) as client:
            client.attach("counted", "lstm").step(np.ones((1, 3), np.float32))
        after = admin.DescribeSession(request, timeout=30).session

    assert (before.steps, before.timesteps) == (3, 6)
    assert not before.HasField("last_step")  # its steps' times are not kept
    assert (after.steps, after.timesteps) == (4, 7)
    assert after.HasField("last_step")


def test_a_snapshot_that_cannot_be_written_at_shutdown_is_reported(
    model_dir, tmp_path, caplog
):
    snapshot_dir = tmp_path / "snap"
    app = App(Config(model_dir=model_dir, port=0, snapshot_dir=str(snapshot_dir)))
    try:
        with client_of(app) as client:
            client.start_session("lstm").step(np.ones((2, 3), np.float32))
        snapshot_dir.rename(tmp_path / "moved")
        snapshot_dir.write_text("a file where the directory was\n")
    finally:
        with caplog.at_level(logging.ERROR):
            complete = app.stop(grace_s=0)

    assert complete is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("1 sessions were not written" in e for e in errors), errors
