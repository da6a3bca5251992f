"""Who is calling: bearer tokens and client certificates, checked on every call.

A token file holds one `name token` pair per line (`#` starts a comment); the
name is the identity of whoever presents the token. With mutual TLS and no
token file, the identity is the client certificate's common name. Sessions
belong to the identity that started them (see `SessionRegistry`).

The health service stays open: probes carry no token.
"""

import dataclasses
import hashlib
import hmac
import logging
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
    `admin_tokens` None: admin calls take the ordinary tokens.
    """

    def __init__(
        self,
        tokens: TokenTable | None,
        admin_tokens: TokenTable | None,
        certificates: bool,
    ):
        self._tokens = tokens
        self._admin_tokens = admin_tokens
        self._certificates = certificates

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        tokens = self._tokens
        if method.startswith(ADMIN_PREFIX) and self._admin_tokens is not None:
            tokens = self._admin_tokens
        identity = None
        if tokens is not None:
            identity = _token_identity(handler_call_details.invocation_metadata, tokens)
            if identity is None:
                return _refusal(handler, method)
        return _with_caller(handler, identity, self._certificates)


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


def _attach(context, identity: str | None, certificates: bool):
    if identity is None and certificates:
        identity = _certificate_identity(context)
        if identity is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "expected a client certificate with a common name, received none",
            )
    client = identity if identity is not None else _peer_host(context.peer())
    return _CallerContext(context, Caller(identity, client))


def _with_caller(handler, identity: str | None, certificates: bool):
    """The same handler, with the caller attached to its context."""
    behavior, factory = _behavior(handler)
    if handler.response_streaming:

        def call(request, context):
            yield from behavior(request, _attach(context, identity, certificates))

    else:

        def call(request, context):
            return behavior(request, _attach(context, identity, certificates))

    return factory(
        call,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusal(handler, method: str):
    behavior, factory = _behavior(handler)
    log.debug("refused %s: missing or unknown bearer token", method)

    def refuse(request, context):
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "expected metadata `authorization: Bearer <token>` with a known token, "
            "received none or an unknown one",
        )

    if handler.response_streaming:

        def refuse_stream(request, context):
            refuse(request, context)
            yield  # never reached; makes this a generator, as the kind requires

        return factory(refuse_stream)
    return factory(refuse)


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
