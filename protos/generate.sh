#!/usr/bin/env bash
# Regenerates the checked-in Python code and typed stubs from the .proto files.
# Run from anywhere with the dev environment active; tests/test_protos.py fails
# when the checked-in code differs from what this script produces.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
bin=$(dirname "$(command -v python)")
python -m grpc_tools.protoc -I "$here" \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$here"/seqserve/v1/*.proto
