"""Bearer tokens on every call, and sessions that belong to their starter."""

import concurrent.futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.client import (
    PermissionDeniedError,
    ResourceExhaustedError,
    Session,
    UnauthenticatedError,
)
from seqserve.server.auth import AuthInterceptor, TokenTable, load_tokens
from seqserve.server.config import Config, SettingError
from seqserve.server.core import SequenceCore
from seqserve.server.errors import NotFound, PermissionDenied
from seqserve.server.session_admin import SessionAdmin
from seqserve.v1 import admin_pb2, admin_pb2_grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from conftest import client_for, running_server
from fake_model import FakeModel
from rpc_helpers import stub_for, tensor
from small_models import frames, lstm_model, offline_outputs, save_models

ALICE, BOB, OPS = "alice-7f3a9c2e41d8", "bob-0c55e1b9aa27", "ops-93d1f07c6b4e"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = lstm_model()
    directory = save_models(tmp_path_factory.mktemp("models"), {"lstm": model})
    return model, directory


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens.write_text(f"# name token\nalice {ALICE}\nbob {BOB}  # a comment\n")
    with running_server(model[1], token_file=tokens) as app:
        yield app


def test_a_missing_or_wrong_token_is_unauthenticated(app):
    for token in (None, "guess", ALICE[:-1], ALICE + "0", BOB.upper()):
        with client_for(app, token=token) as client:
            with pytest.raises(UnauthenticatedError):
                client.list_models()
            with pytest.raises(UnauthenticatedError):
                client.start_session("lstm")
    with client_for(app, token=ALICE) as client:
        assert [m.name for m in client.list_models()] == ["lstm"]


def test_a_token_outside_the_bearer_scheme_is_unauthenticated(app):
    with stub_for(app) as stub:
        for value in (ALICE, f"Basic {ALICE}", f"Bearer{ALICE}"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(
                    pb.ListModelsRequest(), metadata=[("authorization", value)]
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.ListModels(
            pb.ListModelsRequest(), metadata=[("authorization", f"bearer {ALICE}")]
        )
        assert [m.name for m in reply.models] == ["lstm"]


def test_a_stream_without_a_token_is_unauthenticated(app):
    with stub_for(app) as stub:
        request = pb.StepRequest(session_id="x", inputs=tensor(np.zeros((1, 3))))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StepStream(iter([request]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_session_call_with_other_credentials_is_permission_denied(app, model):
    keras_model, _ = model
    x = frames(np.random.default_rng(3), 5)
    with client_for(app, token=ALICE) as alice, client_for(app, token=BOB) as bob:
        session = alice.start_session("lstm")
        first = session.step(x[:3])
        stolen = Session(bob, session.id, session.model)
        state = session.get_state()
        calls = {
            "Step": lambda: stolen.step(x[3:]),
            "StepMany": lambda: bob.step_many([stolen], x[None, 3:]),
            "Reset": stolen.reset,
            "GetState": stolen.get_state,
            "SetState": lambda: stolen.set_state(state),
            "EndSession": stolen.close,
        }
        for call in calls.values():
            with pytest.raises(PermissionDeniedError):
                call()
        (outcome,) = bob.step_stream([(stolen, x[3:])])
        assert isinstance(outcome, PermissionDeniedError)

        # Nothing bob tried touched alice's session.
        second = session.step(x[3:])
        assert session.timesteps == 5
        session.close()
    np.testing.assert_allclose(
        np.concatenate([first, second]), offline_outputs(keras_model, x), atol=1e-5
    )


def test_a_mixed_step_many_names_the_session_of_other_credentials(app):
    x = np.zeros((2, 1, 3), np.float32)
    with client_for(app, token=ALICE) as alice, client_for(app, token=BOB) as bob:
        own, theirs = bob.start_session("lstm"), alice.start_session("lstm")
        stolen = Session(bob, theirs.id, theirs.model)
        with pytest.raises(PermissionDeniedError) as caught:
            bob.step_many([own, stolen], x)
        assert "session_ids[1]" in caught.value.details
        assert (own.get_state()["lstm"]["h"] == 0).all()


def test_sessions_per_client_count_per_token(model, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    with running_server(model[1], token_file=tokens, max_sessions_per_client=2) as app:
        with client_for(app, token=ALICE) as alice, client_for(app, token=BOB) as bob:
            first = alice.start_session("lstm")
            alice.start_session("lstm")
            with pytest.raises(ResourceExhaustedError) as caught:
                alice.start_session("lstm")
            assert "--max-sessions-per-client" in caught.value.details
            bob.start_session("lstm")  # bob's count is his own
            first.close()
            alice.start_session("lstm")


def test_an_admin_token_alone_leaves_the_session_calls_open(model, tmp_path):
    admins = tmp_path / "admin-tokens"
    admins.write_text(f"ops {OPS}\n")
    with running_server(model[1], admin_token_file=admins) as app:
        with client_for(app) as client, client.start_session("lstm") as session:
            session.step(np.zeros((1, 3), np.float32))
            assert session.timesteps == 1


def test_without_an_admin_token_file_no_user_token_reaches_the_admin_calls(app):
    # With --token-file alone, a user token must not list or evict the
    # sessions of others: every admin call is refused, whoever asks.
    with client_for(app, token=ALICE) as alice:
        session = alice.start_session("lstm")
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            calls = [
                (admin.ListSessions, admin_pb2.ListSessionsRequest()),
                (
                    admin.DescribeSession,
                    admin_pb2.DescribeSessionRequest(session_id=session.id),
                ),
                (
                    admin.EvictSession,
                    admin_pb2.EvictSessionRequest(session_id=session.id),
                ),
                (admin.EvictSessions, admin_pb2.EvictSessionsRequest(all_models=True)),
            ]
            for token in (BOB, ALICE, None):
                for method, request in calls:
                    with pytest.raises(grpc.RpcError) as caught:
                        method(request, timeout=30, metadata=_bearer(token))
                    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The one requirement on the text: it names the setting to add.
            assert "--admin-token-file" in caught.value.details()
        session.step(np.zeros((1, 3), np.float32))  # still alice's, still live
        assert session.timesteps == 1
        session.close()


def test_on_a_real_server_admin_calls_take_the_admin_token_and_health_is_open(
    model, tmp_path
):
    tokens, admins = tmp_path / "tokens", tmp_path / "admin-tokens"
    tokens.write_text(f"alice {ALICE}\n")
    admins.write_text(f"ops {OPS}\n")
    settings = {"token_file": tokens, "admin_token_file": admins}
    with running_server(model[1], **settings) as app:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            admin = admin_pb2_grpc.AdminServiceStub(channel)
            sessions = admin_pb2.ListSessionsRequest()
            admin.ListSessions(sessions, timeout=30, metadata=_bearer(OPS))
            sequence = pb_grpc.SequenceServiceStub(channel)
            sequence.ListModels(
                pb.ListModelsRequest(), timeout=30, metadata=_bearer(ALICE)
            )
            refused = [
                (admin.ListSessions, sessions, ALICE),
                (admin.ListSessions, sessions, None),
                (sequence.ListModels, pb.ListModelsRequest(), OPS),
            ]
            for method, request, token in refused:
                with pytest.raises(grpc.RpcError) as caught:
                    method(request, timeout=30, metadata=_bearer(token))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _bearer(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else None


def test_admin_calls_take_the_admin_token_and_health_stays_open():
    # The admin service lives elsewhere; this checks the interceptor's rules on
    # a real gRPC server with stand-in methods that echo the caller's identity.
    users = TokenTable([("alice", ALICE)])
    admins = TokenTable([("ops", OPS)])

    def echo(request, context):
        identity = context.seqserve_caller.identity
        return (identity or "").encode()

    methods = {"Check": lambda request, context: b"serving"}
    handlers = [
        grpc.method_handlers_generic_handler(
            "seqserve.v1.AdminService",
            {"ListSessions": grpc.unary_unary_rpc_method_handler(echo)},
        ),
        grpc.method_handlers_generic_handler(
            "seqserve.v1.SequenceService",
            {"ListModels": grpc.unary_unary_rpc_method_handler(echo)},
        ),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {k: grpc.unary_unary_rpc_method_handler(v) for k, v in methods.items()},
        ),
    ]
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(2),
        interceptors=[AuthInterceptor(users, admins, certificates=False)],
    )
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = _caller(channel)
            assert call("/grpc.health.v1.Health/Check", None) == b"serving"
            assert call("/seqserve.v1.AdminService/ListSessions", OPS) == b"ops"
            assert call("/seqserve.v1.SequenceService/ListModels", ALICE) == b"alice"
            for method, token in [
                ("/seqserve.v1.AdminService/ListSessions", ALICE),
                ("/seqserve.v1.AdminService/ListSessions", None),
                ("/seqserve.v1.SequenceService/ListModels", OPS),
            ]:
                with pytest.raises(grpc.RpcError) as caught:
                    call(method, token)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "users, certificates, expected",
    [
        (TokenTable([("alice", ALICE)]), False, grpc.StatusCode.PERMISSION_DENIED),
        (None, True, grpc.StatusCode.PERMISSION_DENIED),
        (None, False, None),
    ],
    ids=["tokens", "client certificates", "no auth"],
)
def test_without_admin_tokens_admin_calls_are_refused_unless_auth_is_off(
    users, certificates, expected
):
    refused = []
    interceptor = AuthInterceptor(users, None, certificates, refused.append)
    handlers = grpc.method_handlers_generic_handler(
        "seqserve.v1.AdminService",
        {"ListSessions": grpc.unary_unary_rpc_method_handler(lambda r, c: b"open")},
    )
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(2), interceptors=[interceptor]
    )
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = _caller(channel)
            for token in (ALICE, None):
                if expected is None:
                    assert (
                        call("/seqserve.v1.AdminService/ListSessions", token) == b"open"
                    )
                    continue
                with pytest.raises(grpc.RpcError) as caught:
                    call("/seqserve.v1.AdminService/ListSessions", token)
                assert caught.value.code() == expected
    finally:
        server.stop(0)
    assert refused == ([] if expected is None else [expected] * 2)


def _caller(channel):
    def call(method: str, token: str | None) -> bytes:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return channel.unary_unary(method)(b"", timeout=30, metadata=metadata)

    return call


def test_a_token_file_is_read_strictly(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("\n# comment only\nalice secret-1\n  bob   secret-2  \n")
    table = load_tokens(path)
    assert len(table) == 2
    assert (table.identify("secret-2"), table.identify("secret-")) == ("bob", None)
    for text in [
        "",
        "# nobody\n",
        "alice\n",
        "alice secret extra\n",
        "alice s1\nalice s2\n",
        "alice s1\nbob s1\n",
    ]:
        path.write_text(text)
        with pytest.raises(ValueError):
            load_tokens(path)


def test_a_server_with_an_unreadable_token_file_does_not_start(tmp_path):
    # The token file is read before any model loads: with no models at all,
    # the token file is still what the server complains about.
    bad = tmp_path / "tokens"
    bad.write_text("alice\n")
    no_models = tmp_path / "models"
    no_models.mkdir()
    with pytest.raises(SettingError, match="token_file: .*line 1"):
        with running_server(no_models, token_file=bad):
            pass
    with pytest.raises(SettingError, match="admin_token_file"):
        with running_server(no_models, admin_token_file=tmp_path / "missing"):
            pass


def test_an_operator_may_evict_a_session_of_any_owner():
    core = SequenceCore([FakeModel()], Config(port=0))
    x = np.ones((1, 1), np.float32)
    try:
        core.start_session("fake", "s", None, caller="alice", client="alice")
        with pytest.raises(PermissionDenied):
            core.step("s", x, caller="bob")
        assert SessionAdmin(core).evict("s") == 0
        with pytest.raises(NotFound):
            core.step("s", x, caller="alice")
    finally:
        core.close()
