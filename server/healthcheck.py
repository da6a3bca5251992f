"""`seqserve-healthcheck`: exits 0 when the server's health service says SERVING.

For container health checks; imports neither TensorFlow nor the server.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seqserve-healthcheck",
        description="Asks a seqserve server's gRPC health service whether it serves.",
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--service", default="", help='"" for the whole server')
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
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


if __name__ == "__main__":
    sys.exit(main())
