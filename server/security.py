"""What the server's transport enforces: TLS, tokens, message sizes.

Every file named by a setting is read and checked here, at start, so that a
typo stops the server with a `SettingError` naming the setting rather than a
failure to listen later on.
"""

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc

from .auth import AuthInterceptor, TokenTable, load_tokens
from .config import Config, SettingError

log = logging.getLogger(__name__)

GRPC_MESSAGE_LIMIT = 2**31 - 1


def hard_message_limit(max_message_bytes: int) -> int:
    """What gRPC itself receives at most. Between `max_message_bytes` and this,
    the request parser refuses a request naming --max-message-bytes; above it,
    gRPC refuses it with its own message (and ends a stream with it)."""
    return min(2 * max_message_bytes, GRPC_MESSAGE_LIMIT)


def server_options(config: Config) -> list[tuple[str, int]]:
    return [
        (
            "grpc.max_receive_message_length",
            hard_message_limit(config.max_message_bytes),
        ),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


def interceptors(
    config: Config, rejected: Callable[[grpc.StatusCode], None] | None = None
) -> list[grpc.ServerInterceptor]:
    """The auth interceptor, when tokens or client certificates are required;
    `rejected` counts each call it refuses.

    Raises SettingError when a token file cannot be read or parsed.
    """
    if not config.auth_enabled and config.admin_token_file is None:
        return []
    tokens = _tokens(config, "token_file")
    admin_tokens = _tokens(config, "admin_token_file")
    log.info(
        "auth on: %s; admin calls take %s",
        f"{len(tokens)} bearer tokens" if tokens else "no token",
        f"{len(admin_tokens)} admin tokens" if admin_tokens else "none",
    )
    if admin_tokens is None:
        log.warning("admin calls are refused: auth is on, --admin-token-file unset")
    certificates = config.tls_client_ca_file is not None
    return [AuthInterceptor(tokens, admin_tokens, certificates, rejected)]


def _tokens(config: Config, name: str) -> TokenTable | None:
    path = getattr(config, name)
    if path is None:
        return None
    try:
        return load_tokens(path)
    except OSError as error:
        raise _unreadable(name, path, error) from None
    except ValueError as error:
        raise SettingError(f"{name}: {error}") from None


def listen(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `address`, over TLS with credentials; returns the bound port.

    Raises RuntimeError when gRPC cannot bind it. The credentials were checked
    when they were made, so what is left is the address itself."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(
            f"could not listen on {address}: the port is in use, or the host is "
            "not an address of this machine"
        )
    return port


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials from the certificate files, or None for plaintext.

    Raises SettingError when a file cannot be read, holds no PEM certificate,
    or the key does not belong to the certificate."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        if config.admin_token_file or config.token_file:
            log.warning("bearer tokens travel in plain text: configure TLS")
        return None
    chain = _certificates(config, "tls_cert_file")
    key = _read(config, "tls_key_file")
    _check_key(config)
    client_ca = None
    if config.tls_client_ca_file is not None:
        client_ca = _certificates(config, "tls_client_ca_file")
    log.info(
        "TLS on%s",
        " with client certificates required" if client_ca else "",
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read(config: Config, name: str) -> bytes:
    path = getattr(config, name)
    try:
        return path.read_bytes()
    except OSError as error:
        raise _unreadable(name, path, error) from None


def _unreadable(name: str, path: Path, error: OSError) -> SettingError:
    return SettingError(
        f"{name}: expected a readable file, received {str(path)!r} "
        f"({error.strerror or error}); check the path and its permissions"
    )


def _certificates(config: Config, name: str) -> bytes:
    """The file's bytes, once OpenSSL has found PEM certificates in them."""
    data = _read(config, name)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=data.decode("ascii")
        )
    except (UnicodeDecodeError, ssl.SSLError) as error:
        raise SettingError(
            f"{name}: expected PEM certificates (-----BEGIN CERTIFICATE-----), "
            f"received {str(getattr(config, name))!r}, which holds none that "
            f"load ({_reason(error)})"
        ) from None
    return data


def _check_key(config: Config) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            config.tls_cert_file,
            config.tls_key_file,
            password=_no_password,
        )
    except ssl.SSLError as error:
        raise SettingError(
            f"tls_key_file: expected the unencrypted PEM private key of the "
            f"certificate in tls_cert_file, received {str(config.tls_key_file)!r}, "
            f"which does not load with it ({_reason(error)})"
        ) from None


def _no_password() -> bytes:
    # Without this, OpenSSL would ask for the key's password on the terminal.
    return b""


def _reason(error: Exception) -> str:
    """OpenSSL's reason (`KEY_VALUES_MISMATCH`: "key values mismatch")."""
    reason = getattr(error, "reason", None)
    return reason.replace("_", " ").lower() if reason else str(error)
