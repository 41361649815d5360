"""The operator process does not load the ``kubernetes`` package (nor pydantic, which its
models need), whatever else is installed: it speaks to the API server through the shared
client, and kopf is imported without its optional model support (kopf_plain)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("kubernetes", "kubernetes_asyncio", "pykube", "pydantic")


def loaded_after(code: str, cwd: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (outside the checkout: its top-level operator/
    would shadow the standard library's) and report what it left imported."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{n: n in sys.modules for n in {HEAVY!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.splitlines()[-1]))


def test_the_operator_entry_point_loads_neither_kubernetes_nor_pydantic(tmp_path: Path) -> None:
    import kubernetes  # the dev venv has it (tests use it): the point is that it stays unused

    del kubernetes
    got = loaded_after("import hostdev.operator.main", tmp_path)
    assert got == dict.fromkeys(HEAVY, False)


def test_kopf_plain_restores_the_names_it_hid(tmp_path: Path) -> None:
    got = loaded_after("import hostdev.operator.kopf_plain\nimport kubernetes.client", tmp_path)
    assert got["kubernetes"] and got["pydantic"]


def test_kopf_plain_leaves_an_already_imported_client_alone(tmp_path: Path) -> None:
    code = (
        "import kubernetes.client\n"
        "from hostdev.operator.kopf_plain import kopf\n"
        "from kopf._cogs.helpers import thirdparty\n"
        "assert thirdparty.V1ObjectMetaSync is kubernetes.client.V1ObjectMeta"
    )
    assert loaded_after(code, tmp_path)["kubernetes"]
