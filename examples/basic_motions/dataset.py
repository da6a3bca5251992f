"""Read multivariate recordings in the UEA/UCR `.ts` text format.

After the `@data` line each recording is one line: channels separated by `:`,
samples by `,`, the class label last. All recordings must have the same length.
"""

from pathlib import Path

import numpy as np


def _class_names(line: str, lineno: int) -> list[str]:
    parts = line.split()
    if len(parts) < 3 or parts[1].lower() != "true":
        raise ValueError(f"line {lineno}: expected '@classLabel true NAME...'")
    return parts[2:]


def _parse_recording(line: str, lineno: int) -> tuple[np.ndarray, str]:
    *channels, label = line.split(":")
    if not channels:
        raise ValueError(f"line {lineno}: no ':' separating channels from label")
    try:
        rows = [[float(v) for v in ch.split(",")] for ch in channels]
    except ValueError as err:
        raise ValueError(f"line {lineno}: bad sample value ({err})") from None
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"line {lineno}: channels have different lengths")
    return np.asarray(rows, dtype=np.float32).T, label.strip()


def load_ts(path: str | Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Return X [n, timesteps, channels] float32, per-recording labels, class names.

    Class names keep the order of the `@classLabel` header.
    """
    classes: list[str] = []
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise ValueError(f"line {lineno}: not a header line before @data")
                key = line.split(maxsplit=1)[0].lower()
                if key == "@classlabel":
                    classes = _class_names(line, lineno)
                in_data = key == "@data"
                continue
            x, label = _parse_recording(line, lineno)
            if series and x.shape != series[0].shape:
                raise ValueError(
                    f"line {lineno}: shape {x.shape} differs from {series[0].shape}"
                    " (timesteps, channels) of the first recording"
                )
            if label not in classes:
                raise ValueError(f"line {lineno}: label {label!r} not in {classes}")
            series.append(x)
            labels.append(label)
    if not series:
        raise ValueError(f"{path}: no recordings after @data")
    return np.stack(series), labels, classes
