"""The checked-in generated code is exactly what protos/generate.sh produces."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "protos" / "seqserve" / "v1"


def test_generated_code_is_up_to_date(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(
        ["bash", str(REPO / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = tmp_path / "seqserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(
        [
            "admin_pb2.py",
            "admin_pb2.pyi",
            "admin_pb2_grpc.py",
            "admin_pb2_grpc.pyi",
            "seqserve_pb2.py",
            "seqserve_pb2.pyi",
            "seqserve_pb2_grpc.py",
            "seqserve_pb2_grpc.pyi",
        ]
    )
    match, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert (mismatch, errors) == ([], []), (
        "run protos/generate.sh and commit the result"
    )
