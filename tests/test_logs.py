"""Lifecycle at INFO, requests at DEBUG, JSON lines, the session id on session lines."""

import io
import json
import logging

import grpc
import numpy as np
import pytest

from seqserve.client import InvalidArgumentError, NotFoundError
from seqserve.server import logs

from conftest import client_for, running_server
from small_models import frames, lstm_model, save_models


@pytest.fixture
def json_lines():
    """Reads back what the seqserve loggers wrote as JSON lines, at DEBUG and at
    INFO: `json_lines(logging.INFO)`."""
    streams = {logging.DEBUG: io.StringIO(), logging.INFO: io.StringIO()}
    logger = logging.getLogger("seqserve")
    old_level, handlers = logger.level, []
    logger.setLevel(logging.DEBUG)
    for level, stream in streams.items():
        handlers.append(logs.handler("json", stream))
        handlers[-1].setLevel(level)
        logger.addHandler(handlers[-1])
    yield lambda level: [json.loads(x) for x in streams[level].getvalue().splitlines()]
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("logs"), {"lstm": lstm_model()})


def test_session_lines_carry_the_id_and_requests_stay_at_debug(model_dir, json_lines):
    with running_server(model_dir) as app, client_for(app) as client:
        session = client.start_session("lstm")
        session.step(frames(np.random.default_rng(0), 2))
        session.close()
        with pytest.raises(NotFoundError):
            session.step(frames(np.random.default_rng(0), 1))

    debug = json_lines(logging.DEBUG)
    about = [line for line in debug if line.get("session_id") == session.id]
    assert [(line["level"], line["message"]) for line in about] == [
        ("DEBUG", "session started on model 'lstm' version 1"),
        ("DEBUG", "session ended by the client"),
        ("DEBUG", f"Step refused: session {session.id!r} was ended by the client; "
         "start a new session to continue"),
    ]  # fmt: skip
    assert {line["logger"] for line in about} == {
        "seqserve.server.core",
        "seqserve.server.servicer",
    }
    # An ended session's model is no longer known; the key is there all the same.
    assert [line["model"] for line in about] == ["lstm", "lstm", ""]

    info = json_lines(logging.INFO)
    assert all("session_id" not in line for line in info)
    messages = [line["message"] for line in info]
    assert messages[0].startswith(f"listening on 127.0.0.1:{app.port}")
    loaded = next(m for m in messages if m.startswith("loaded model 'lstm'"))
    assert "state lstm.h[5], lstm.c[5]" in loaded
    assert messages[-1].startswith("stopped after")
    assert "served 1 steps (2 timesteps)" in messages[-1]
    assert (
        "sessions started 1, ended 1 closed, 0 idle_timeout, 0 evicted"
        in (messages[-1])
    )


def test_refused_step_many_and_stream_steps_carry_session_and_model(
    model_dir, json_lines
):
    wrong = np.zeros((1, 7), np.float32)  # 7 features, not 3
    with running_server(model_dir) as app, client_for(app) as client:
        one, two = client.start_session("lstm"), client.start_session("lstm")
        with pytest.raises(InvalidArgumentError):
            client.step_many([one], wrong[None])
        with pytest.raises(InvalidArgumentError):
            client.step_many([one, two], np.stack([wrong, wrong]))
        (outcome,) = client.step_stream([(two, wrong)])
        assert isinstance(outcome, InvalidArgumentError)

    debug = json_lines(logging.DEBUG)
    refused = [line for line in debug if " refused: " in line["message"]]
    assert [
        (line["message"].split(":")[0], line.get("session_id"), line["model"])
        for line in refused
    ] == [
        ("StepMany refused", one.id, "lstm"),
        ("StepMany refused", None, "lstm"),
        ("StepStream step refused", two.id, "lstm"),
    ]
    assert refused[1]["session_ids"] == [one.id, two.id]


def test_an_unexpected_stream_error_is_logged_once_with_the_session(
    model_dir, json_lines, monkeypatch
):
    def broken_reply(model, result):
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr("seqserve.server.servicer._step_reply", broken_reply)
    with running_server(model_dir) as app, client_for(app) as client:
        session = client.start_session("lstm")
        (outcome,) = client.step_stream(
            [(session, frames(np.random.default_rng(0), 1))]
        )
        assert outcome.code == grpc.StatusCode.INTERNAL

    errors = [line for line in json_lines(logging.INFO) if line["level"] == "ERROR"]
    assert [(e["message"], e["session_id"], e["model"]) for e in errors] == [
        ("unexpected error in StepStream", session.id, "lstm")
    ]
    assert "RuntimeError: a bug nobody foresaw" in errors[0]["exc_info"]


def test_text_lines_end_with_the_session_id():
    stream = io.StringIO()
    logger, handler = (
        logging.getLogger("seqserve.test_text"),
        logs.handler("text", stream),
    )
    logger.addHandler(handler)
    logger.propagate = False
    try:
        session = type("Session", (), {"id": "abc", "model": "m"})()
        logger.warning("about one", extra=logs.about(session))
        logger.warning("about none")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second = stream.getvalue().splitlines()
    assert first.endswith("WARNING seqserve.test_text: about one [session abc]")
    assert second.endswith("WARNING seqserve.test_text: about none")
