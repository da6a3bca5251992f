"""The gRPC admin servicer: decode, call the session admin, encode."""

import time

from google.protobuf.timestamp_pb2 import Timestamp

from seqserve.v1 import admin_pb2 as pb
from seqserve.v1 import admin_pb2_grpc as pb_grpc

from .metrics import Metrics
from .servicer import _statuses
from .session_admin import SessionAdmin
from .sessions import Session


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, admin: SessionAdmin, metrics: Metrics | None = None):
        self.admin = admin
        self.metrics = admin.core.metrics if metrics is None else metrics

    @property
    def core(self):
        """The core the session admin works on (for log lines about a session)."""
        return self.admin.core

    @_statuses
    def ListSessions(self, request, context):
        sessions, total, more = self.admin.list_sessions(
            request.model, request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[session_info(s) for s in sessions],
            next_page_token=sessions[-1].id if more else "",
            total=total,
        )

    @_statuses
    def DescribeSession(self, request, context):
        session = self.admin.describe(request.session_id)
        return pb.DescribeSessionResponse(session=session_info(session))

    @_statuses
    def EvictSession(self, request, context):
        return pb.EvictSessionResponse(timesteps=self.admin.evict(request.session_id))

    @_statuses
    def EvictSessions(self, request, context):
        evicted = self.admin.evict_all(request.model, request.all_models)
        return pb.EvictSessionsResponse(evicted=evicted)


def session_info(session: Session) -> pb.SessionInfo:
    info = pb.SessionInfo(
        session_id=session.id,
        model=session.model,
        version=session.version,
        created=_timestamp(session.created_s),
        steps=session.step_number,
        timesteps=session.timesteps,
    )
    if session.last_step_s:
        info.last_step.CopyFrom(_timestamp(session.last_step_s))
    return info


def _timestamp(monotonic_s: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() - time.monotonic() + monotonic_s) * 1e9))
    return stamp
