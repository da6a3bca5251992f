"""Limits on message size, timesteps per step and sessions per client."""

import grpc
import numpy as np
import pytest

from seqserve.client import ResourceExhaustedError
from seqserve.server.config import Config
from seqserve.server.security import hard_message_limit
from seqserve.v1 import seqserve_pb2 as pb

from conftest import client_for, running_server
from rpc_helpers import refusal, stub_for, tensor
from small_models import FEATURES, lstm_model, save_models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("models"), {"lstm": lstm_model()})


def test_a_message_over_the_size_limit_is_refused_naming_the_flag(model_dir):
    limit = 64 * 1024
    fits = np.zeros((limit // (4 * FEATURES) - 100, FEATURES), np.float32)
    too_big = np.zeros((limit // (4 * FEATURES) + 100, FEATURES), np.float32)
    with running_server(model_dir, max_message_bytes=limit) as app:
        with stub_for(app) as stub:
            session = stub.StartSession(pb.StartSessionRequest(model="lstm"))
            step = pb.StepRequest(session_id=session.session_id)
            step.inputs.CopyFrom(tensor(too_big))
            size = step.ByteSize()
            error = refusal(stub.Step, step)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The requirement is about the message: it names the flag and sizes.
            assert "--max-message-bytes" in error.details()
            assert f"{limit} bytes" in error.details()
            assert f"{size} bytes" in error.details()

            small = pb.StepRequest(session_id=session.session_id)
            small.inputs.CopyFrom(tensor(fits))
            (refused, served) = stub.StepStream(iter([step, small]), timeout=30)
            assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "--max-message-bytes" in refused.error.message
            assert served.response.timesteps == len(fits)

            # Timesteps since start: the stream's step, then this one.
            assert stub.Step(small, timeout=30).timesteps == 2 * len(fits)


def test_above_twice_the_limit_grpc_refuses_the_message_itself(model_dir):
    limit = 64 * 1024
    huge = np.zeros((2 * limit // (4 * FEATURES) + 100, FEATURES), np.float32)
    with running_server(model_dir, max_message_bytes=limit) as app:
        with stub_for(app) as stub:
            session = stub.StartSession(pb.StartSessionRequest(model="lstm"))
            step = pb.StepRequest(session_id=session.session_id, inputs=tensor(huge))
            assert step.ByteSize() > hard_message_limit(limit)
            error = refusal(stub.Step, step)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # gRPC's own refusal ends a whole stream, not just the step.
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.StepStream(iter([step]), timeout=30))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_hard_limit_is_twice_the_setting_within_grpc_s_range():
    assert hard_message_limit(1024) == 2048
    assert hard_message_limit(2**31 - 1) == 2**31 - 1
    assert hard_message_limit(2**30 + 1) == 2**31 - 1


def test_timesteps_over_the_limit_are_invalid_argument(model_dir):
    with running_server(model_dir, max_timesteps=8) as app, stub_for(app) as stub:
        session_id = stub.StartSession(pb.StartSessionRequest(model="lstm")).session_id
        step = pb.StepRequest(session_id=session_id)
        step.inputs.CopyFrom(tensor(np.zeros((9, FEATURES), np.float32)))
        error = refusal(stub.Step, step)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-timesteps" in error.details()

        many = pb.StepManyRequest(session_ids=[session_id])
        many.inputs.CopyFrom(tensor(np.zeros((1, 9, FEATURES), np.float32)))
        assert refusal(stub.StepMany, many).code() == grpc.StatusCode.INVALID_ARGUMENT

        step.inputs.CopyFrom(tensor(np.zeros((8, FEATURES), np.float32)))
        assert stub.Step(step, timeout=30).timesteps == 8


def test_sessions_per_client_without_auth_count_per_address(model_dir):
    with running_server(model_dir, max_sessions_per_client=2) as app:
        with client_for(app) as client, client_for(app) as same_host:
            first = client.start_session("lstm")
            same_host.start_session("lstm")
            with pytest.raises(ResourceExhaustedError) as caught:
                client.start_session("lstm")
            assert "--max-sessions-per-client" in caught.value.details
            first.close()
            client.start_session("lstm")
            assert len(app.core.sessions) == 2


@pytest.mark.parametrize(
    "settings",
    [
        {"max_message_bytes": 1023},
        {"max_message_bytes": 2**31},
        {"max_sessions_per_client": -1},
        {"model_poll_interval_s": -1.0},
        {"tls_cert_file": "server.crt"},
        {"tls_key_file": "server.key"},
        {"tls_client_ca_file": "ca.crt"},
    ],
    ids=lambda settings: next(iter(settings)),
)
def test_limit_and_security_settings_are_validated(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        Config(**settings)


def test_limit_and_security_settings_come_from_the_environment():
    config = Config.from_args(
        ["--max-sessions-per-client=3"],
        environ={
            "SEQSERVE_MAX_MESSAGE_BYTES": "1048576",
            "SEQSERVE_MAX_SESSIONS_PER_CLIENT": "9",
            "SEQSERVE_TOKEN_FILE": "/run/secrets/tokens",
            "SEQSERVE_MODEL_POLL_INTERVAL_S": "0",
        },
    )
    assert (config.max_message_bytes, config.max_sessions_per_client) == (2**20, 3)
    assert str(config.token_file) == "/run/secrets/tokens"
    assert config.auth_enabled and config.model_poll_interval_s == 0
