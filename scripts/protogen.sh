#!/usr/bin/env bash
# The one codegen command: regenerate protos/scepsy/v1/*_pb2*.py{,i} from the .proto files.
# Run from anywhere; generates relative to the repo root so modules import as protos.scepsy.v1.
# Usage: scripts/protogen.sh [OUT_DIR]   (OUT_DIR defaults to the repo root; `make check` uses a
# temporary directory and diffs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"
export PATH="$(dirname "$py"):$PATH"  # protoc-gen-mypy{,_grpc} live beside the interpreter
mkdir -p "$out/protos/scepsy/v1"
"$py" -m grpc_tools.protoc -I. \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/scepsy/v1/*.proto
