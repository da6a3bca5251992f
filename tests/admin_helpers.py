"""Raw access to the admin service and the metrics endpoint of a test server."""

import contextlib
import urllib.request
from collections.abc import Iterator

import grpc
from prometheus_client.parser import text_string_to_metric_families

from seqserve.v1 import admin_pb2_grpc

TIMEOUT_S = 30


@contextlib.contextmanager
def admin_for(app) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def scrape(app) -> dict[tuple[str, tuple], float]:
    """Every sample on the metrics endpoint, by (name, sorted labels)."""
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
