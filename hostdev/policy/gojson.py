"""JSON bytes exactly as Go's ``encoding/json`` ``MarshalIndent(v, "", "  ")`` writes them. Pure.

Files other programs compare or checksum (KEP-5304 device metadata, CDI specs) must match what
the upstream Go helpers write byte for byte. Python's encoder with ``indent=2`` and
``ensure_ascii=False`` lays values out the same way; Go additionally escapes ``<``, ``>``, ``&``
(HTML safety) and U+2028/U+2029, which cannot occur in JSON outside strings, so escaping them in
the whole text is exact. Key order is the caller's: build dicts in Go struct field order, and
sort the keys of what Go holds in maps (``sort_maps``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_GO_ESCAPES = str.maketrans(
    {
        "<": "\\u003c",
        ">": "\\u003e",
        "&": "\\u0026",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)


def marshal_indent(value: Any) -> str:
    """``json.MarshalIndent(value, "", "  ")`` (no trailing newline)."""
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False).translate(_GO_ESCAPES)


def sorted_map(m: Mapping[str, Any]) -> dict[str, Any]:
    """A Go map as encoding/json writes it: keys in byte order."""
    return {k: m[k] for k in sorted(m, key=lambda k: k.encode())}
