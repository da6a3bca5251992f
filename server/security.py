"""What the server's transport enforces: TLS, tokens, message sizes."""

import logging

import grpc

from .auth import AuthInterceptor, load_tokens
from .config import Config

log = logging.getLogger(__name__)


def server_options(config: Config) -> list[tuple[str, int]]:
    """gRPC refuses a larger message itself, with RESOURCE_EXHAUSTED."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


def interceptors(config: Config) -> list[grpc.ServerInterceptor]:
    """The auth interceptor, when tokens or client certificates are required.

    Raises OSError or ValueError when a token file cannot be read or parsed.
    """
    if not config.auth_enabled and config.admin_token_file is None:
        return []
    tokens = admin_tokens = None
    if config.token_file is not None:
        tokens = load_tokens(config.token_file)
    if config.admin_token_file is not None:
        admin_tokens = load_tokens(config.admin_token_file)
    log.info(
        "auth on: %s; admin calls take %s",
        f"{len(tokens)} bearer tokens" if tokens else "no token",
        "their own tokens" if admin_tokens else "the same credentials",
    )
    certificates = config.tls_client_ca_file is not None
    return [AuthInterceptor(tokens, admin_tokens, certificates)]


def listen(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `address`, over TLS with credentials; 0 on failure."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        return 0


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials from the certificate files, or None for plaintext.

    Raises OSError when a file cannot be read."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        if config.admin_token_file or config.token_file:
            log.warning("bearer tokens travel in plain text: configure TLS")
        return None
    chain = config.tls_cert_file.read_bytes()
    key = config.tls_key_file.read_bytes()
    client_ca = None
    if config.tls_client_ca_file is not None:
        client_ca = config.tls_client_ca_file.read_bytes()
    log.info(
        "TLS on%s",
        " with client certificates required" if client_ca else "",
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
