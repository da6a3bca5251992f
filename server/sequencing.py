"""Step numbers, deadlines and cancellation, checked where a step applies.

The model's executor calls `admit` for each step just before it runs and
`record` just after, on its one thread. So the check and the apply cannot be
separated by another step of the session, and a step refused here changed
nothing.
"""

import dataclasses
import time

import numpy as np

from .errors import Cancelled, DeadlineExceeded, NotFound, StepOutOfOrder
from .sessions import ENDED_BY_CLIENT, Session, ended_message


def admit(op) -> bool:
    """True when the step should run now; otherwise settles its future."""
    try:
        repeat = _check(op)
    except Exception as error:
        op.future.set_exception(error)
        return False
    if repeat is not None:
        op.future.set_result(repeat)
        return False
    return True


def _check(op):
    """The stored reply for a repeat, None to run; raises to refuse."""
    session = op.session
    if session.released:
        raise NotFound(ended_message(session.id, session.end_reason or ENDED_BY_CLIENT))
    check_call(op)
    if not op.step_number:
        return None
    expected = session.step_number + 1
    if op.step_number == expected:
        return None
    if op.step_number == session.step_number and session.last_reply is not None:
        return session.last_reply
    raise StepOutOfOrder(session.id, expected, op.step_number)


def check_call(op) -> None:
    """Refuses work for a call that was cancelled or whose deadline passed."""
    if op.cancelled is not None and op.cancelled():
        raise Cancelled("the call was cancelled before the step ran; not applied")
    if op.deadline_s is not None and time.monotonic() > op.deadline_s:
        raise DeadlineExceeded(
            "the call's deadline passed before the step ran; not applied. Retry "
            "with a longer deadline"
        )


def record(op, result):
    """Counts the applied step (its number is in `result`); keeps its reply when
    it was numbered."""
    session = op.session
    session.step_number = result.step_number
    if not op.step_number:
        session.last_reply = None
        return result
    # Rows of the batch's arrays: copied, so a kept reply holds no whole batch.
    kept = dataclasses.replace(
        result,
        outputs=[np.array(x) for x in result.outputs],
        state=None if result.state is None else [np.array(x) for x in result.state],
    )
    session.last_reply = kept
    return kept


def advance(sessions: list[Session]) -> list[int]:
    """Counts an unnumbered step of each session (StepMany)."""
    for session in sessions:
        session.step_number += 1
        session.last_reply = None
    return [session.step_number for session in sessions]
