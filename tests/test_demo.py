"""The README's demo: held-out recordings streamed sample by sample through the
bundled model equal the offline model, and classify well."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, running_server


@pytest.mark.slow
def test_demo_streams_every_recording_exactly(bundled_model_dir):
    with running_server(bundled_model_dir) as app:
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "basic_motions" / "demo.py"),
                "--target",
                f"127.0.0.1:{app.port}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    equal = re.search(r"streamed equals offline Keras for (\d+)/(\d+)", result.stdout)
    assert equal and equal.group(1) == equal.group(2) == "40", result.stdout
    accuracy = re.search(r"accuracy: ([0-9.]+)", result.stdout)
    assert accuracy and float(accuracy.group(1)) >= 0.9, result.stdout
