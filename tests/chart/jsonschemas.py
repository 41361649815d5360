"""JSON schemas for kubeconform, made from sources that match what the chart targets:

- built-in kinds from the OpenAPI v2 document of the real test API server (the same Kubernetes
  version the install test uses), as one self-contained file per kind;
- custom resources from their CRDs' ``openAPIV3Schema`` (the chart's crds/).

Strict mode, as kubeconform's own schema repository does it: objects that declare properties
reject unknown ones (a misspelt field fails), except where the API allows anything
(``x-kubernetes-preserve-unknown-fields``, maps with ``additionalProperties``).
File names follow the template ``{kind}_{group}_{version}.json`` (see ``LOCATION``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: kubeconform -schema-location template for the files written here (lower-case kind; group
#: is the apiVersion's group or "v1" for the core group, as kubeconform splits it).
LOCATION = "{{ .ResourceKind }}_{{ .Group }}_{{ .ResourceAPIVersion }}.json"


def _strict(schema: Any) -> Any:
    """A strict copy of one schema node; walks only schema positions (a property *named*
    "type" or "x-kubernetes-int-or-string", as in JSONSchemaProps, is data, not a keyword)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(v) for v in out[key]]
    # OpenAPI spells int-or-string as a string with a format (v2) or an extension (CRDs)
    if (out.get("type") == "string" and out.get("format") == "int-or-string") or out.get(
        "x-kubernetes-int-or-string"
    ):
        out.pop("type", None)
        out["anyOf"] = [{"type": "string"}, {"type": "integer"}]
    # kubeconform validates with JSON Schema semantics: "nullable" fields accept null
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _file_name(group: str, version: str, kind: str) -> str:
    return f"{kind.lower()}_{group or 'v1'}_{version}.json"


def write_builtin_schemas(openapi_v2: Mapping[str, Any], out: Path) -> list[str]:
    """One file per built-in kind, each carrying every definition (refs stay resolvable)."""
    definitions = {k: _strict(v) for k, v in copy.deepcopy(dict(openapi_v2["definitions"])).items()}
    # IntOrString / Quantity are referenced, not inlined: fix them at the definition
    for name in list(definitions):
        if name.endswith(("util.intstr.IntOrString", "api.resource.Quantity")):
            definitions[name] = {
                "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]
            }
    written = []
    for name, schema in definitions.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            if name.startswith("io.k8s.apimachinery.pkg.apis.meta.v1."):
                continue  # WatchEvent, DeleteOptions, ... are registered for every group
            file = _file_name(gvk["group"], gvk["version"], gvk["kind"])
            doc = {"$ref": f"#/definitions/{name}", "definitions": definitions}
            (out / file).write_text(json.dumps(doc), encoding="utf-8")
            written.append(file)
    return written


def write_crd_schemas(crds: Iterable[Mapping[str, Any]], out: Path) -> list[str]:
    written = []
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # apiVersion/kind/metadata are validated by the API server, not the CRD schema
            schema.setdefault("properties", {}).update(
                {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                }
            )
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
            file = _file_name(spec["group"], version["name"], spec["names"]["kind"])
            (out / file).write_text(json.dumps(schema), encoding="utf-8")
            written.append(file)
    return written
