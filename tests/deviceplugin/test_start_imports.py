"""What the agent's cluster-mode start path imports before the kubelet holds its lists: the
modules of the way to the first ListAndWatch answer, in a fresh interpreter. Heavy modules
there cost every node's start (issue 15: 0.12 s at 1 x 8 from spawn)."""

from __future__ import annotations

import json
import subprocess
import sys

from hostdev.deviceplugin.startcache import START_PATH

# Each is a measured cost (python -X importtime) the start does without: http.client loads
# the email package (~13 ms), the kubernetes client ~0.4 s, YAML only for kubeconfigs.
NOT_ON_START_PATH = ("http.client", "email", "kubernetes", "yaml", "grpc", "google.protobuf")


def test_cluster_start_path_leaves_out_heavy_modules() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {START_PATH!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # From /: the checkout's top-level operator/ would shadow the standard library's module.
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert set(START_PATH) <= loaded
    heavy = {m for m in loaded if m in NOT_ON_START_PATH or m.split(".")[0] in NOT_ON_START_PATH}
    assert not heavy
