"""Who is calling: bearer tokens and client certificates, checked on every call.

A token file holds one `name token` pair per line (`#` starts a comment); the
name is the identity of whoever presents the token. With mutual TLS and no
token file, the identity is the client certificate's common name. Sessions
belong to the identity that started them (see `SessionRegistry`).

The health service stays open: probes carry no token. The admin service takes
its own tokens; with auth on and none configured, it is refused to everyone.
"""

import dataclasses
import hashlib
import hmac
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
ADMIN_PREFIX = "/seqserve.v1.AdminService/"
BEARER = "bearer "


@dataclasses.dataclass(frozen=True)
class Caller:
    """`identity`: None when auth is off. `client`: what per-client limits count
    (the identity, or the peer's address without auth)."""

    identity: str | None
    client: str


class TokenTable:
    """Names by token. Lookups compare against every token in constant time."""

    def __init__(self, entries: list[tuple[str, str]]):
        self._entries = [(name, _digest(token)) for name, token in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> str | None:
        # Digests of equal length: compare_digest would reveal a length mismatch.
        given = _digest(token)
        found = None
        for name, known in self._entries:
            # No early exit: the time taken must not tell which token matched.
            if hmac.compare_digest(given, known):
                found = name
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path) -> TokenTable:
    """Reads `name token` lines; raises ValueError naming the line at fault."""
    entries: list[tuple[str, str]] = []
    names, tokens = set(), set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected `name token`, received {len(fields)} fields"
            )
        name, token = fields
        if name in names or token in tokens:
            raise ValueError(
                f"{where}: expected a new name and token, received a repeat"
            )
        names.add(name)
        tokens.add(token)
        entries.append((name, token))
    if not entries:
        raise ValueError(f"{path}: expected at least one `name token` line, found none")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    return TokenTable(entries)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid token (UNAUTHENTICATED) and tells the
    servicer who is calling, through `caller_of(context)`.

    `tokens` None: no token needed, only the client certificate names the caller.
    `admin_tokens`: what admin calls take. None: with tokens or client
    certificates, admin calls are refused (PERMISSION_DENIED): an ordinary
    caller must not list or evict the sessions of others; with neither, they
    are open. `rejected` counts each refused call by its status code.
    """

    def __init__(
        self,
        tokens: TokenTable | None,
        admin_tokens: TokenTable | None,
        certificates: bool,
        rejected: Callable[[grpc.StatusCode], None] | None = None,
    ):
        self._tokens = tokens
        self._admin_tokens = admin_tokens
        self._certificates = certificates
        self._auth_on = tokens is not None or certificates
        self._rejected = rejected or (lambda code: None)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        tokens = self._tokens
        if method.startswith(ADMIN_PREFIX):
            if self._admin_tokens is None and self._auth_on:
                return self._refusal(handler, method, *ADMIN_OFF)
            tokens = self._admin_tokens
        identity = None
        if tokens is not None:
            identity = _token_identity(handler_call_details.invocation_metadata, tokens)
            if identity is None:
                return self._refusal(handler, method, *NO_TOKEN)
        return _with_caller(handler, identity, self._certificates, self._rejected)

    def _refusal(self, handler, method: str, code: grpc.StatusCode, detail: str):
        behavior, factory = _behavior(handler)
        log.debug("refused %s: %s", method, detail)

        def refuse(request, context):
            self._rejected(code)
            context.abort(code, detail)

        if handler.response_streaming:

            def refuse_stream(request, context):
                refuse(request, context)
                yield  # never reached; makes this a generator, as the kind requires

            return factory(refuse_stream)
        return factory(refuse)


NO_TOKEN = (
    grpc.StatusCode.UNAUTHENTICATED,
    "expected metadata `authorization: Bearer <token>` with a known token, "
    "received none or an unknown one",
)
ADMIN_OFF = (
    grpc.StatusCode.PERMISSION_DENIED,
    "expected an admin token, but this server has none: admin calls are refused "
    "while auth is on and --admin-token-file is not set; restart the server with "
    "--admin-token-file to allow them",
)
NO_CERTIFICATE = (
    grpc.StatusCode.UNAUTHENTICATED,
    "expected a client certificate with a common name, received none",
)


def caller_of(context) -> Caller:
    """The caller of this call; without the interceptor, anonymous by address."""
    caller = getattr(context, "seqserve_caller", None)
    if caller is not None:
        return caller
    return Caller(None, _peer_host(context.peer()))


def identity_of(context) -> str | None:
    caller = getattr(context, "seqserve_caller", None)
    return None if caller is None else caller.identity


def _token_identity(metadata, tokens: TokenTable) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(BEARER)].lower() == BEARER:
                return tokens.identify(value[len(BEARER) :].strip())
    return None


def _certificate_identity(context) -> str | None:
    properties = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = properties.get(key)
        if values:
            return values[0].decode()
    return None


class _CallerContext:
    """The servicer context, with the caller attached."""

    def __init__(self, context, caller: Caller):
        self._context = context
        self.seqserve_caller = caller

    def __getattr__(self, name):
        return getattr(self._context, name)


def _attach(context, identity: str | None, certificates: bool, rejected):
    if identity is None and certificates:
        identity = _certificate_identity(context)
        if identity is None:
            rejected(NO_CERTIFICATE[0])
            context.abort(*NO_CERTIFICATE)
    client = identity if identity is not None else _peer_host(context.peer())
    return _CallerContext(context, Caller(identity, client))


def _with_caller(handler, identity: str | None, certificates: bool, rejected):
    """The same handler, with the caller attached to its context."""
    behavior, factory = _behavior(handler)

    def attached(context):
        return _attach(context, identity, certificates, rejected)

    if handler.response_streaming:

        def call(request, context):
            yield from behavior(request, attached(context))

    else:

        def call(request, context):
            return behavior(request, attached(context))

    return factory(
        call,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler):
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.1:5000` -> `ipv4:10.0.0.1`: one client, whatever its port."""
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer
