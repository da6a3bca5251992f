"""Versioned model directories, new versions loaded while serving, and old
versions unloaded when their last session ends."""

import os
import time

import numpy as np
import pytest

from seqserve.client import NotFoundError
from seqserve.server.config import Config
from seqserve.server.core import SequenceCore
from seqserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from seqserve.server.model_versions import VersionWatcher, scan

from conftest import client_for, running_server
from fake_model import FakeModel
from small_models import frames, gru_model, lstm_model, offline_outputs

WAIT_S = 60

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"  # Keras 3.15's own save
)


def test_the_layout_names_versions_and_ignores_other_files(tmp_path):
    for relative in [
        "lstm.keras",
        "lstm/2.keras",
        "lstm/10.h5",
        "lstm/0.keras",
        "lstm/latest.keras",
        "lstm/notes.txt",
        "lstm/.3.keras",
        ".hidden.keras",
        "gru/3.keras",
        "gru/1.keras",
        "readme.md",
    ]:
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "gru.keras").write_bytes(b"claims version 1 too")

    files = scan(tmp_path)
    assert sorted(files) == [
        ("gru", 1),
        ("gru", 3),
        ("lstm", 1),
        ("lstm", 2),
        ("lstm", 10),
    ]
    assert files["gru", 1].path == tmp_path / "gru.keras"  # the plain file wins


@pytest.mark.slow  # the first Keras loads of the module
def test_the_newest_version_serves_new_sessions(tmp_path):
    old, new = lstm_model(seed=0), lstm_model(seed=5)
    old.save(tmp_path / "lstm.keras")
    (tmp_path / "lstm").mkdir()
    new.save(tmp_path / "lstm" / "2.keras")
    gru_model().save(tmp_path / "gru.keras")
    x = frames(np.random.default_rng(0), 5)
    with running_server(tmp_path, model_poll_interval_s=0) as app:
        with client_for(app) as client:
            listed = [(m.name, m.version) for m in client.list_models()]
            assert listed == [("gru", 1), ("lstm", 2)]
            with client.start_session("lstm") as session:
                assert session.model.version == 2
                np.testing.assert_allclose(
                    session.step(x), offline_outputs(new, x), atol=1e-5
                )
            with pytest.raises(NotFoundError):
                client.start_session("lstm", version=1)  # nobody holds it


@pytest.mark.slow
@pytest.mark.parametrize("state_storage", ["host", "tensorflow"])
def test_a_new_version_dropped_in_leaves_live_sessions_on_the_old(
    tmp_path, state_storage
):
    old, new = lstm_model(seed=0), lstm_model(seed=5)
    old.save(tmp_path / "lstm.keras")
    x = frames(np.random.default_rng(1), 8)
    settings = {"model_poll_interval_s": 0.05, "state_storage": state_storage}
    with running_server(tmp_path, **settings) as app:
        with client_for(app) as client:
            before = client.start_session("lstm")
            first = before.step(x[:3])

            _drop_in(new, tmp_path / "lstm" / "2.keras")
            _drop_in(gru_model(), tmp_path / "gru.keras")  # a new model, too
            _wait_for(lambda: app.core.models["lstm"].version == 2)
            _wait_for(lambda: "gru" in app.core.models)
            pinned = client.start_session("lstm", version=1)
            after = client.start_session("lstm")
            assert (before.model.version, pinned.model.version) == (1, 1)
            assert after.model.version == 2
            listed = [(m.name, m.version) for m in client.list_models()]
            assert listed == [("gru", 1), ("lstm", 1), ("lstm", 2)]

            np.testing.assert_allclose(
                after.step(x), offline_outputs(new, x), atol=1e-5
            )
            second = before.step(x[3:])
            np.testing.assert_allclose(
                np.concatenate([first, second]), offline_outputs(old, x), atol=1e-5
            )
            np.testing.assert_allclose(
                pinned.step(x), offline_outputs(old, x), atol=1e-5
            )

            _, old_executor = app.core.versions.get(("lstm", 1))
            before.close()
            assert app.core.versions.get(("lstm", 1)) is not None  # pinned holds it
            pinned.close()
            _wait_for(lambda: not old_executor._thread.is_alive())
            assert [m.version for m in client.list_models()] == [1, 2]  # gru, lstm
            with pytest.raises(NotFoundError):
                client.start_session("lstm", version=1)
            after.step(x)  # the new version is untouched by the unload


def test_a_file_is_loaded_only_once_it_holds_still(tmp_path):
    (tmp_path / "lstm").mkdir()
    path = tmp_path / "lstm" / "2.keras"
    loaded, refuse = [], True

    def load(file):
        loaded.append(file.version)
        return None if refuse else FakeModel("lstm")

    watcher = VersionWatcher(tmp_path, 1.0, load)
    watcher._newest = lambda name: 1  # as `start` sets it, without the thread
    path.write_bytes(b"half")
    watcher.poll()  # first sight
    _rewrite(path, b"half a file")
    watcher.poll()  # it changed since
    assert loaded == []
    watcher.poll()  # unchanged across two polls: loaded, refused
    watcher.poll()
    assert loaded == [2]  # a refused file is not retried as it is

    refuse = False
    _rewrite(path, b"the whole file")
    watcher.poll()
    assert loaded == [2]
    watcher.poll()
    assert loaded == [2, 2]


def test_an_older_version_is_unloaded_when_its_last_session_expires():
    old, new = FakeModel(), FakeModel()
    new.version = 2
    core = SequenceCore([old], Config(port=0, idle_timeout_s=0.2))
    try:
        core.start_session("fake", "s", None)
        core.versions.add(new)
        assert core.versions.get(("fake", 1)) is not None
        _wait_for(lambda: core.versions.get(("fake", 1)) is None)
        with pytest.raises(NotFound):
            core.start_session("fake", "t", None, version=1)
        session, model = core.start_session("fake", "t", None)
        assert (session.version, model) == (2, new)
    finally:
        core.close()


def test_a_failed_start_does_not_hold_a_version():
    old, new = FakeModel(), FakeModel()
    new.version = 2
    core = SequenceCore([old], Config(port=0, max_sessions=1))
    try:
        core.start_session("fake", "a", None)
        with pytest.raises(ResourceExhausted):  # the registry is full
            core.start_session("fake", "b", None)
        core.versions.add(new)
        core.end_session("a")
        _wait_for(lambda: core.versions.get(("fake", 1)) is None)
    finally:
        core.close()


def _drop_in(model, path):
    """As an operator should: write a hidden file, then rename it into place."""
    staging = path.parent.parent / f".{path.name}.partial.keras"
    model.save(staging)
    path.parent.mkdir(exist_ok=True)
    os.replace(staging, path)


def _rewrite(path, data: bytes) -> None:
    path.write_bytes(data)
    stamp = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(stamp, stamp))  # a new mtime even on a coarse clock


def _wait_for(condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_step_many_refuses_sessions_of_two_versions():
    old, new = FakeModel(), FakeModel()
    new.version = 2
    core = SequenceCore([old], Config(port=0))
    try:
        core.start_session("fake", "on-1", None)
        core.versions.add(new)
        core.start_session("fake", "on-2", None)
        with pytest.raises(InvalidArgument):
            core.step_many(["on-1", "on-2"], np.ones((2, 1, 1), np.float32))
        assert core.read_state("on-1")[2] == core.read_state("on-2")[2] == 0
    finally:
        core.close()


def test_a_refused_newest_version_leaves_the_one_before_serving(tmp_path):
    gru_model().save(tmp_path / "gru.keras")
    (tmp_path / "gru").mkdir()
    (tmp_path / "gru" / "2.keras").write_bytes(b"not a zip archive")
    with running_server(tmp_path, model_poll_interval_s=0) as app:
        with client_for(app) as client:
            assert [(m.name, m.version) for m in client.list_models()] == [("gru", 1)]
