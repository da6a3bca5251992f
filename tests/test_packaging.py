"""The client installs into another service's environment without TensorFlow."""

import subprocess
import sys


def test_client_import_pulls_in_no_tensorflow():
    code = (
        "import sys, seqserve.client; "
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
