"""kopf, imported without its optional support for third-party client models.

Every operator module imports kopf from here (ruff's banned-api rule says so). kopf tries
``kubernetes``, ``kubernetes_asyncio`` and ``pykube``: on its first import, for isinstance
checks on their model objects, and when it makes its default handler registry, to add logins
through them. With ``kubernetes`` installed (the dev venv has it for the tests) that loads the
whole generated client and its pydantic models, ~18 MiB of the operator's memory for checks
that never match (hostdev hands kopf plain dicts only) and logins never used (the operator
has its own, :mod:`.login`). So for those two steps the names are marked absent in
``sys.modules`` (an import of them raises ImportError, which kopf takes as "not installed"),
and restored afterwards, so anyone else may still import them. A name already imported (a
test process may have loaded ``kubernetes`` first) is left alone.
"""

from __future__ import annotations

import sys

OPTIONAL_CLIENTS = ("kubernetes", "kubernetes_asyncio", "pykube")


def _import_kopf_plain() -> None:
    if "kopf" in sys.modules:
        return
    blocked = [name for name in OPTIONAL_CLIENTS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import kopf  # noqa: TID251  (the one import that may)

        kopf.get_default_registry()  # made now, the first @kopf.on... would make it
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


_import_kopf_plain()

import kopf  # noqa: E402, TID251

__all__ = ["kopf"]
