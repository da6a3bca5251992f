"""TLS and mutual TLS from certificate files, against a real server."""

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from seqserve.client import PermissionDeniedError, Session, UnavailableError
from seqserve.server import healthcheck
from seqserve.v1 import admin_pb2, admin_pb2_grpc

from certs import Authority
from conftest import client_for, running_server
from small_models import frames, lstm_model, offline_outputs, save_models

REFUSED_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = lstm_model()
    directory = save_models(tmp_path_factory.mktemp("models"), {"lstm": model})
    return model, directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate and two client certificates, and a
    stranger: a client certificate from another CA."""
    directory = tmp_path_factory.mktemp("pki")
    authority = Authority()
    (directory / "ca.crt").write_bytes(authority.pem)
    cert, key = authority.issue("seqserve", server=True).write(directory, "server")
    return {
        "ca": authority.pem,
        "ca_file": directory / "ca.crt",
        "server": {"tls_cert_file": cert, "tls_key_file": key},
        "alice": authority.issue("alice"),
        "bob": authority.issue("bob"),
        "stranger": Authority("another CA").issue("alice"),
    }


def test_tls_serves_a_client_that_trusts_the_server_and_refuses_plaintext(model, pki):
    keras_model, model_dir = model
    x = frames(np.random.default_rng(0), 6)
    with running_server(model_dir, **pki["server"]) as app:
        with client_for(app, root_certificates=pki["ca"]) as client:
            with client.start_session("lstm") as session:
                np.testing.assert_allclose(
                    session.step(x), offline_outputs(keras_model, x), atol=1e-5
                )
        with client_for(app, timeout_s=REFUSED_TIMEOUT_S) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.list_models()
        untrusting = Authority("not the server's CA").pem
        with client_for(
            app, root_certificates=untrusting, timeout_s=REFUSED_TIMEOUT_S
        ) as client:
            with pytest.raises(UnavailableError):
                client.list_models()


def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(model, pki):
    _, model_dir = model
    settings = pki["server"] | {"tls_client_ca_file": pki["ca_file"]}
    with running_server(model_dir, **settings) as app:
        with client_for(
            app, root_certificates=pki["ca"], timeout_s=REFUSED_TIMEOUT_S
        ) as anonymous:
            with pytest.raises(UnavailableError):
                anonymous.list_models()
        with _client_as(app, pki, "stranger") as stranger:
            with pytest.raises(UnavailableError):
                stranger.list_models()
        with _client_as(app, pki, "alice") as alice:
            assert [m.name for m in alice.list_models()] == ["lstm"]


def test_with_mutual_tls_a_session_belongs_to_its_certificate(model, pki):
    keras_model, model_dir = model
    x = frames(np.random.default_rng(1), 4)
    settings = pki["server"] | {"tls_client_ca_file": pki["ca_file"]}
    with running_server(model_dir, **settings) as app:
        with _client_as(app, pki, "alice") as alice, _client_as(app, pki, "bob") as bob:
            session = alice.start_session("lstm")
            first = session.step(x[:2])
            with pytest.raises(PermissionDeniedError):
                _as(bob, session).step(x[2:])
            second = session.step(x[2:])
    whole = np.concatenate([first, second])
    np.testing.assert_allclose(whole, offline_outputs(keras_model, x), atol=1e-5)


def test_with_mutual_tls_and_no_admin_tokens_admin_calls_are_refused(model, pki):
    _, model_dir = model
    settings = pki["server"] | {"tls_client_ca_file": pki["ca_file"]}
    with running_server(model_dir, **settings) as app:
        credentials = grpc.ssl_channel_credentials(
            pki["ca"], pki["alice"].key, pki["alice"].certificate
        )
        with grpc.secure_channel(f"localhost:{app.port}", credentials) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                admin.ListSessions(admin_pb2.ListSessionsRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_health_check_command_speaks_tls_and_mutual_tls(model, pki, tmp_path):
    _, model_dir = model
    cert, key = pki["alice"].write(tmp_path, "alice")
    address = "--address=localhost:{}"
    trusting = ["--tls-ca-file", str(pki["ca_file"])]
    with running_server(model_dir, **pki["server"]) as app:
        assert healthcheck.main([address.format(app.port), "--timeout-s=5"]) == 1
        assert healthcheck.main([address.format(app.port), *trusting]) == 0
        by_ip = [f"--address=127.0.0.1:{app.port}", *trusting]
        assert healthcheck.main([*by_ip, "--tls-server-name=localhost"]) == 0
    settings = pki["server"] | {"tls_client_ca_file": pki["ca_file"]}
    with running_server(model_dir, **settings) as app:
        mine = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        assert healthcheck.main([address.format(app.port), *trusting, *mine]) == 0
        without = [address.format(app.port), "--timeout-s=5", *trusting]
        assert healthcheck.main(without) == 1
    assert healthcheck.main([*trusting, "--tls-cert-file", str(cert)]) == 1


def test_a_bad_certificate_stops_the_command_line_naming_the_setting(model, pki):
    # Before the server listens, not as "could not listen": exit 2, one line.
    _, model_dir = model
    server, stranger = pki["server"], pki["stranger"].key
    key_of_another = model_dir.parent / "stranger.key"
    key_of_another.write_bytes(stranger)
    not_pem = model_dir.parent / "not-pem.crt"
    not_pem.write_bytes(b"certainly not a certificate\n")
    cases = {
        "tls_cert_file": [
            f"--tls-cert-file={not_pem}",
            f"--tls-key-file={server['tls_key_file']}",
        ],
        "tls_key_file": [
            f"--tls-cert-file={server['tls_cert_file']}",
            f"--tls-key-file={key_of_another}",
        ],
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    for setting, flags in cases.items():
        command = [sys.executable, "-m", "seqserve.server", "--port=0"]
        done = subprocess.run(
            [*command, f"--model-dir={model_dir}", *flags],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 2, done.stderr
        # TensorFlow's C++ start-up lines may come first; ours is one line.
        (line,) = [x for x in done.stderr.splitlines() if "seqserve" in x]
        assert line.startswith(f"seqserve-server: {setting}: ")


def _client_as(app, pki, who: str):
    pem = pki[who]
    return client_for(
        app,
        root_certificates=pki["ca"],
        certificate_chain=pem.certificate,
        private_key=pem.key,
        timeout_s=REFUSED_TIMEOUT_S,
    )


def _as(client, session) -> Session:
    """The same session id, used through another client's credentials."""
    return Session(client, session.id, session.model)
