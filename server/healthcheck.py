"""`seqserve-healthcheck`: exits 0 when the server's health service says SERVING.

For container health checks and Kubernetes exec probes (the native `grpc:`
probe cannot speak TLS); imports neither TensorFlow nor the server. Exits 1
when the server is not serving or cannot be reached, or a TLS file cannot be
read (Docker reserves exit status 2 in health checks).
"""

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        channel = _channel(args)
    except (OSError, ValueError) as error:
        print(f"seqserve-healthcheck: {error}", file=sys.stderr)
        return 1
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout_s,
            )
    except grpc.RpcError as error:
        print(f"{args.address}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve-healthcheck",
        description="Asks a seqserve server's gRPC health service whether it serves.",
        allow_abbrev=False,
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--service", default="", help='"" for the whole server')
    parser.add_argument("--timeout-s", type=float, default=3.0)
    tls = parser.add_argument_group("TLS (any of these turns it on)")
    tls.add_argument(
        "--tls", action="store_true", help="TLS, trusting the system's CAs"
    )
    tls.add_argument("--tls-ca-file", type=Path, help="PEM CA to trust instead")
    tls.add_argument(
        "--tls-cert-file", type=Path, help="PEM client certificate (mutual TLS)"
    )
    tls.add_argument("--tls-key-file", type=Path, help="PEM key of that certificate")
    tls.add_argument(
        "--tls-server-name",
        help="name to expect in the server's certificate, when --address is "
        "not it (such as 127.0.0.1 inside the pod)",
    )
    return parser


def _channel(args) -> grpc.Channel:
    """A channel to the server; raises OSError or ValueError on bad TLS files."""
    client_files = (args.tls_cert_file, args.tls_key_file)
    if (client_files[0] is None) != (client_files[1] is None):
        raise ValueError("--tls-cert-file and --tls-key-file: expected both or neither")
    wants_tls = args.tls or args.tls_ca_file or client_files[0] or args.tls_server_name
    if not wants_tls:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca_file),
        private_key=_read(args.tls_key_file),
        certificate_chain=_read(args.tls_cert_file),
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, credentials, options)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


if __name__ == "__main__":
    sys.exit(main())
