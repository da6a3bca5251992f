"""The standard gRPC health and reflection services, for probes and grpcurl."""

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqserve.v1 import admin_pb2, seqserve_pb2

SEQUENCE_SERVICE = seqserve_pb2.DESCRIPTOR.services_by_name["SequenceService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
# "" is the whole server, as probes ask by default.
HEALTH_NAMES = ("", SEQUENCE_SERVICE.full_name, ADMIN_SERVICE.full_name)


class Health:
    """NOT_SERVING until `serving()`; NOT_SERVING for good once `draining()`."""

    def __init__(self, server):
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def draining(self) -> None:
        # Also ignores any later `set`, so nothing can flip it back.
        self.servicer.enter_graceful_shutdown()

    def _set(self, status) -> None:
        for name in HEALTH_NAMES:
            self.servicer.set(name, status)


def enable_reflection(server) -> None:
    reflection.enable_server_reflection(
        (
            SEQUENCE_SERVICE.full_name,
            ADMIN_SERVICE.full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
