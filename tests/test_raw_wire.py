"""Bytes that no gRPC client sends, written straight to the server's port.

With a plain socket (garbage, HTTP/1.1, a cut-off HTTP/2 preface, connections
dropped mid-frame) and with a raw HTTP/2 client (the `h2` package: gRPC frames
truncated, oversized, wrongly flagged, streams reset mid-message). After each,
the server must still serve a valid call exactly: a session started before
the abuse continues as one offline Keras call on its whole sequence.
"""

import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import numpy as np
import pytest

from seqserve.v1 import seqserve_pb2 as pb

from conftest import running_server
from rpc_helpers import TIMEOUT_S, outputs, stub_for, tensor
from small_models import frames, lstm_model, offline_outputs, save_models

STEP = "/seqserve.v1.SequenceService/Step"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default limit on a received message


@pytest.fixture(scope="module")
def keras_model():
    return lstm_model()


@pytest.fixture(scope="module")
def app(tmp_path_factory, keras_model):
    directory = save_models(tmp_path_factory.mktemp("wire"), {"lstm": keras_model})
    with running_server(directory) as app:
        yield app


class Witness:
    """A session stepped after every abuse; its outputs must stay Keras' own."""

    def __init__(self, app, keras_model):
        self.stub_context = stub_for(app)
        self.stub = self.stub_context.__enter__()
        self.keras_model = keras_model
        self.rng = np.random.default_rng(3)
        self.history = np.zeros((0, 3), np.float32)
        reply = self.stub.StartSession(pb.StartSessionRequest(model="lstm"))
        self.id = reply.session_id

    def assert_serving(self) -> None:
        chunk = frames(self.rng, 2)
        request = pb.StepRequest(session_id=self.id, inputs=tensor(chunk))
        reply = self.stub.Step(request, timeout=TIMEOUT_S)
        self.history = np.concatenate([self.history, chunk])
        expected = offline_outputs(self.keras_model, self.history)[-2:]
        np.testing.assert_allclose(outputs(reply), expected, atol=1e-5)


@pytest.fixture(scope="module")
def witness(app, keras_model):
    witness = Witness(app, keras_model)
    yield witness
    witness.stub_context.__exit__(None, None, None)


def send_raw(port: int, payload: bytes, read_s: float = 0.5) -> bytes:
    """Writes `payload`, reads what comes back until the server closes or
    `read_s` passes, then drops the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(read_s)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


RNG = np.random.default_rng(11)
SOCKET_PAYLOADS = {
    "garbage": RNG.bytes(4096),
    "much garbage": RNG.bytes(1 << 20),
    "http/1.1": b"POST /seqserve.v1.SequenceService/Step HTTP/1.1\r\nHost: x\r\n\r\n",
    "preface cut": PREFACE[:10],
    "preface then garbage": PREFACE + RNG.bytes(512),
    "frame header cut": PREFACE + b"\x00\x00\x12\x04",
    # A SETTINGS frame that claims 16 MiB of payload, then ends.
    "frame longer than sent": PREFACE + b"\xff\xff\xff\x04\x00\x00\x00\x00\x00",
    "empty": b"",
}


@pytest.mark.parametrize("payload", SOCKET_PAYLOADS.values(), ids=list(SOCKET_PAYLOADS))
def test_socket_abuse_leaves_the_server_serving(app, witness, payload):
    send_raw(app.port, payload)
    witness.assert_serving()


def test_many_half_open_connections_leave_the_server_serving(app, witness):
    sockets = [socket.create_connection(("127.0.0.1", app.port)) for _ in range(200)]
    for index, sock in enumerate(sockets):
        sock.sendall(PREFACE[: index % len(PREFACE)])
    witness.assert_serving()  # while they are all still open
    for sock in sockets:
        sock.close()
    witness.assert_serving()


class RawCall:
    """One gRPC call written by hand over HTTP/2."""

    def __init__(self, port: int, path: str = STEP, content_type="application/grpc"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.events: list = []  # everything received, in order
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            self.stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", content_type),
                ("te", "trailers"),
            ],
        )
        self.flush()

    def send(self, data: bytes, end: bool = True, wait_s: float = 10.0) -> None:
        """Sends `data` in chunks the flow-control window allows; stops early
        once the server has answered, reset the stream or closed."""
        deadline = time.monotonic() + wait_s
        while data and not self.answered() and time.monotonic() < deadline:
            room = min(self.conn.local_flow_control_window(self.stream), 16384)
            if room == 0:
                self.read_events(0.2)
                continue
            self.conn.send_data(self.stream, data[:room])
            data = data[room:]
            self.flush()
        if end and not data and not self.answered():
            self.conn.end_stream(self.stream)
            self.flush()

    def answered(self) -> bool:
        return any(isinstance(e, ENDINGS) for e in self.events)

    def reset(self) -> None:
        self.conn.reset_stream(self.stream)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def status(self, wait_s: float = 5.0) -> int | None:
        """The call's grpc-status, or None when the server reset or closed."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for event in self.read_events(deadline - time.monotonic()):
                if isinstance(
                    event, h2.events.TrailersReceived | h2.events.ResponseReceived
                ):
                    headers = dict(event.headers)
                    if "grpc-status" in headers:
                        return int(headers["grpc-status"])
                if isinstance(
                    event, h2.events.StreamReset | h2.events.ConnectionTerminated
                ):
                    return None
        return None

    def read_events(self, wait_s: float) -> list:
        self.sock.settimeout(max(wait_s, 0.01))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        if not data:
            events = [h2.events.ConnectionTerminated()]
        else:
            try:
                events = self.conn.receive_data(data)
                self.flush()
            except (h2.exceptions.ProtocolError, OSError):
                events = [h2.events.ConnectionTerminated()]
        self.events += events
        return events

    def close(self) -> None:
        self.sock.close()


HEADERS = (h2.events.ResponseReceived, h2.events.TrailersReceived)
ENDINGS = (
    h2.events.TrailersReceived,
    h2.events.StreamEnded,
    h2.events.StreamReset,
    h2.events.ConnectionTerminated,
)


def grpc_frame(message: bytes, compressed: bool = False, length=None) -> bytes:
    size = len(message) if length is None else length
    return struct.pack(">BI", int(compressed), size) + message


def valid_step(session_id: str) -> bytes:
    x = np.ones((1, 3), np.float32)
    return pb.StepRequest(session_id=session_id, inputs=tensor(x)).SerializeToString()


def code(name: str) -> int:
    return grpc.StatusCode[name].value[0]


def test_raw_http2_valid_call_is_answered(app, witness):
    call = RawCall(app.port)
    call.send(grpc_frame(valid_step("never-started")))
    assert call.status() == code("NOT_FOUND")
    call.close()
    witness.assert_serving()


# (what is sent after the headers, the statuses gRPC may answer with: None is a
# reset stream or closed connection). gRPC Python answers a unary call whose
# message never arrived whole with UNIMPLEMENTED; we cannot change that.
CUT = {"UNIMPLEMENTED", "INTERNAL", None}
H2_ABUSE = {
    "truncated frame": (grpc_frame(b"\x0a\x03abc", length=100), CUT),
    "prefix cut": (b"\x00\x00\x00", CUT),
    "garbage message": (grpc_frame(RNG.bytes(300)), {"INVALID_ARGUMENT", None}),
    "oversized claim": (grpc_frame(b"", length=64 << 20), {"RESOURCE_EXHAUSTED", None}),
    "oversized message": (
        grpc_frame(b"\x0a" + RNG.bytes(MAX_MESSAGE + 10)),
        {"RESOURCE_EXHAUSTED", None},
    ),
    "compressed without encoding": (
        grpc_frame(b"\x0a\x01x", compressed=True),
        {"INTERNAL", "UNIMPLEMENTED", None},
    ),
    # gRPC reads the first; "a" is no session.
    "two messages in a unary call": (
        grpc_frame(valid_step("a")) + grpc_frame(valid_step("b")),
        {"NOT_FOUND", "INTERNAL", "UNIMPLEMENTED", None},
    ),
    "no message": (b"", CUT),
}


@pytest.mark.parametrize("body, statuses", H2_ABUSE.values(), ids=list(H2_ABUSE))
def test_raw_http2_abuse_gets_an_error_and_the_server_keeps_serving(
    app, witness, body, statuses
):
    call = RawCall(app.port)
    call.send(body)
    allowed = {None if name is None else code(name) for name in statuses}
    assert call.status() in allowed
    call.close()
    witness.assert_serving()


@pytest.mark.parametrize("path", [STEP, "/seqserve.v1.SequenceService/Nope", "/x"])
def test_raw_http2_unknown_paths_and_content_types(app, witness, path):
    call = RawCall(app.port, path=path, content_type="text/plain")
    call.send(grpc_frame(valid_step("x")))
    assert call.status() != code("OK")
    call.close()
    witness.assert_serving()


def test_raw_http2_stream_reset_mid_message_and_connection_dropped(app, witness):
    calls = [RawCall(app.port) for _ in range(20)]
    for index, call in enumerate(calls):
        call.send(grpc_frame(valid_step("x"), length=1000)[:30], end=False)
        if index % 2:
            call.reset()
    for call in calls:
        call.close()  # mid-message, without ending the stream
    witness.assert_serving()


def test_oversized_message_from_a_real_client_is_resource_exhausted(app, witness):
    options = [("grpc.max_send_message_length", -1)]
    big = np.zeros((MAX_MESSAGE // 12 + 10, 3), np.float32)
    request = pb.StepRequest(session_id=witness.id, inputs=tensor(big))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        step = channel.unary_unary(STEP)
        with pytest.raises(grpc.RpcError) as refused:
            step(request.SerializeToString(), timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    witness.assert_serving()
