#!/usr/bin/env bash
# Generates the Python gRPC stubs (+ .pyi type stubs) for the kubelet APIs hostdev speaks.
#   scripts/gen-protos.sh [OUT_ROOT]   (default: the repository root, i.e. regenerate in place)
# The .proto files are compiled through the hostdev/deviceplugin symlink so that protoc writes
# `from hostdev.deviceplugin.api... import api_pb2` in the _grpc modules: no import rewriting.
# Output is deterministic, so tests/deviceplugin/test_protos_fresh.py can diff it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
PROTOS=(
  hostdev/deviceplugin/api/deviceplugin/v1beta1/api.proto
  hostdev/deviceplugin/api/podresources/v1/api.proto
  hostdev/deviceplugin/api/pluginregistration/v1/api.proto
  hostdev/deviceplugin/api/dra/v1/api.proto
  hostdev/deviceplugin/api/dra/v1beta1/api.proto
  hostdev/deviceplugin/api/drahealth/v1/api.proto
  hostdev/deviceplugin/api/drahealth/v1alpha1/api.proto
)
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I . \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  --python_out="$OUT" --mypy_out="$OUT" \
  --grpc_python_out="$OUT" --mypy_grpc_out="$OUT" \
  "${PROTOS[@]}"
