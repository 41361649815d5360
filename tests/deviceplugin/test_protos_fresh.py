"""The checked-in kubelet API stubs must be exactly what scripts/gen-protos.sh generates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
API = REPO / "deviceplugin" / "api"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi")
# Lines naming the generator's version: a patch release of grpcio-tools/protobuf changes only
# these, which is not staleness.
VERSION_MARKERS = ("GRPC_GENERATED_VERSION = ", "# Protobuf Python Version: ")


_RUNTIME_CHECK = re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S)


def _normalised(path: Path) -> list[str]:
    text = _RUNTIME_CHECK.sub("", path.read_text())
    return [line for line in text.splitlines() if not line.startswith(VERSION_MARKERS)]


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [str(REPO / "scripts" / "gen-protos.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    protos = sorted(API.rglob("*.proto"))
    assert protos, "no .proto files under deviceplugin/api"
    for proto in protos:
        rel = proto.parent.relative_to(REPO / "deviceplugin")
        for name in GENERATED:
            fresh = tmp_path / "hostdev" / "deviceplugin" / rel / name
            checked_in = proto.parent / name
            assert checked_in.exists(), f"{checked_in} missing: run `make protos`"
            assert _normalised(fresh) == _normalised(checked_in), (
                f"{checked_in.relative_to(REPO)} is stale: run `make protos` and commit"
            )
