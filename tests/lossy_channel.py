"""A client whose channel loses some Step replies after the server applied them."""

import threading

import grpc

from seqserve.client import Client, RetryPolicy


class LostReply(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the test dropped the reply"

    def trailing_metadata(self):
        return ()


class ReplyDropper(grpc.UnaryUnaryClientInterceptor):
    """Lets every `every`-th Step reach the server, then loses its reply.

    `losing` overrides that for every Step while set: "reply" lets each reach
    the server and loses its reply, "request" loses each before it is sent.
    """

    def __init__(self, every: int):
        self.every, self.calls, self.dropped = every, 0, 0
        self.losing: str | None = None
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        if not details.method.endswith("/Step"):
            return continuation(details, request)
        with self._lock:
            self.calls += 1
            losing = self.losing
            drop = losing is not None or self.calls % self.every == 0
            self.dropped += drop
        if losing == "request":
            raise LostReply()
        call = continuation(details, request)
        if drop:
            call.result()  # the server applied it; the client never hears
            raise LostReply()
        return call


def dropping_client(
    app, every: int, retry: RetryPolicy | None = None
) -> tuple[Client, ReplyDropper]:
    dropper = ReplyDropper(every)
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{app.port}"), dropper
    )
    retry = retry or RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
    return Client("unused", channel=channel, retry=retry), dropper
