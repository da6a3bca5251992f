"""The reference models' shape, without importing Keras.

Input width 32, one recurrent layer of 128 units (LSTM or GRU), a Dense head
of 8, outputs per timestep.
"""

FEATURES = 32
UNITS = 128
OUTPUTS = 8
KINDS = ("lstm", "gru")


def model_name(kind: str) -> str:
    """The served name, also the file's stem: "lstm128" or "gru128"."""
    return f"{kind}{UNITS}"


def state_bytes(kind: str) -> int:
    """Raw float32 state of one session: h and c for an LSTM, h for a GRU."""
    parts = 2 if kind == "lstm" else 1
    return parts * UNITS * 4
