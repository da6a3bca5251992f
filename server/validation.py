"""Checks of request contents against a model, before anything is queued.

Keras is lax where a server must not be: it broadcasts a batch-1 state and
ignores a surplus GRU state. Every check here names what was expected and what
was received.
"""

import numpy as np

from .errors import InvalidArgument
from .models import ServedModel

# One part of a state as it arrives: (layer, part, value).
StateEntry = tuple[str, str, np.ndarray]


def check_inputs(
    model: ServedModel,
    inputs: np.ndarray,
    sessions: int | None = None,
    max_timesteps: int | None = None,
) -> np.ndarray:
    """One session's inputs [timesteps, ...], or, with `sessions`, the inputs of
    that many sessions [sessions, timesteps, ...]."""
    spec = model.input
    lead = () if sessions is None else (sessions,)
    expected_shape = [*lead, "timesteps", *spec.shape[1:]]
    time_axis = len(lead)
    if inputs.dtype != spec.dtype:
        raise InvalidArgument(
            f"inputs: model {model.name!r} expects dtype {spec.dtype.name}, "
            f"received {inputs.dtype.name}"
        )
    if (
        inputs.ndim != len(lead) + len(spec.shape)
        or inputs.shape[:time_axis] != lead
        or inputs.shape[time_axis + 1 :] != spec.shape[1:]
    ):
        raise InvalidArgument(
            f"inputs: model {model.name!r} expects shape {expected_shape}, "
            f"received {list(inputs.shape)}"
        )
    if inputs.shape[time_axis] == 0:
        raise InvalidArgument("inputs: expected at least 1 timestep, received 0")
    if max_timesteps is not None and inputs.shape[time_axis] > max_timesteps:
        raise InvalidArgument(
            f"inputs: expected at most {max_timesteps} timesteps in one step "
            f"(--max-timesteps), received {inputs.shape[time_axis]}; send them "
            "in several steps"
        )
    _check_tokens(model, inputs)
    if inputs.dtype.kind == "f" and not np.isfinite(inputs).all():
        bad = np.argwhere(~np.isfinite(inputs))[0].tolist()
        raise InvalidArgument(
            f"inputs: expected finite values, received {inputs[tuple(bad)]} at "
            f"index {bad}"
        )
    return inputs


def _check_tokens(model: ServedModel, inputs: np.ndarray) -> None:
    # An index outside an Embedding fails the model on the CPU, and a negative
    # one silently reads another row; neither may reach it.
    vocabulary = getattr(model, "vocabulary", None)
    if vocabulary is None or inputs.dtype.kind != "i":
        return
    outside = (inputs < 0) | (inputs >= vocabulary)
    if outside.any():
        bad = np.argwhere(outside)[0].tolist()
        raise InvalidArgument(
            f"inputs: model {model.name!r} expects token ids from 0 to "
            f"{vocabulary - 1}, received {inputs[tuple(bad)]} at index {bad}"
        )


def check_state(model: ServedModel, entries: list[StateEntry], what: str):
    """Returns the parts in the model's order; every part exactly once."""
    expected = {(p.layer, p.part): p.units for p in model.state_parts}
    received: dict[tuple[str, str], np.ndarray] = {}
    for layer, part, value in entries:
        key = (layer, part)
        if key not in expected:
            raise InvalidArgument(
                f"{what}: model {model.name!r} has no state part {layer}.{part}; "
                f"expected parts {_names(expected)}"
            )
        if key in received:
            raise InvalidArgument(f"{what}: state part {layer}.{part} given twice")
        _check_part(value, expected[key], f"{what} part {layer}.{part}")
        received[key] = value
    missing = [key for key in expected if key not in received]
    if missing:
        raise InvalidArgument(
            f"{what}: expected {len(expected)} state parts {_names(expected)}, "
            f"received {len(received)}; missing {_names(missing)}"
        )
    return [received[key] for key in expected]


def _check_part(value: np.ndarray, units: int, what: str) -> None:
    if value.dtype != np.float32:
        raise InvalidArgument(f"{what}: expected dtype float32, received {value.dtype}")
    if value.shape != (units,):
        raise InvalidArgument(
            f"{what}: expected shape [{units}] (one session's state), received "
            f"{list(value.shape)}"
        )
    if not np.isfinite(value).all():
        raise InvalidArgument(f"{what}: expected finite values")


def _names(keys) -> str:
    return "[" + ", ".join(f"{layer}.{part}" for layer, part in keys) + "]"
