"""Render kustomizations and validate every object offline, the way a strict API server would.

    python k8s/validate.py k8s/overlays/cpu-smoke k8s/overlays/gpu

Built-in kinds: the Kubernetes OpenAPI schemas shipped by `kubernetes-validate` (strict: unknown
fields are errors). Custom kinds: the CRD schemas in k8s/schemas/ (*.schema.yaml, see refresh.py),
made strict the same way (an object with `properties` accepts no other fields, as server-side
field validation rejects them) with int32 bounds; `$ref`s resolve into the Kubernetes definitions.
A kind with neither is an error, never a pass. CEL rules (x-kubernetes-validations) are not run.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv_utils

K8S_VERSION = "1.37.0"
SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
_OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def render(kustomization_dir: str) -> list[dict]:
    """`kubectl kustomize DIR` -> the rendered objects. Raises RuntimeError with kubectl's message."""
    if shutil.which("kubectl") is None:
        raise RuntimeError(
            "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/) to render the kustomizations"
        )
    proc = subprocess.run(["kubectl", "kustomize", kustomization_dir], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def strict_schema(node: Any) -> Any:
    """OpenAPI v3 (structural CRD schema) -> JSON Schema that rejects unknown fields."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("additionalProperties", "items", "not", "anyOf", "allOf", "oneOf"):
            out[key] = strict_schema(value)
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("type") == "integer" and node.get("format") in _INT_RANGE:
        lo, hi = _INT_RANGE[node["format"]]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    return out


def _k8s_definitions() -> referencing.Registry:
    defs = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION
    )
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


def load_crd_validators(schema_dir: str = SCHEMA_DIR) -> dict[tuple[str, str], jsonschema.Validator]:
    """{(apiVersion, kind): validator} for every k8s/schemas/*.schema.yaml."""
    registry = _k8s_definitions()
    validators = {}
    for path in sorted(glob.glob(os.path.join(schema_dir, "*.schema.yaml"))):
        with open(path) as f:
            doc = yaml.safe_load(f)
        schema = strict_schema(doc["openAPIV3Schema"])
        # The API server validates metadata as ObjectMeta whatever the CRD says.
        schema["properties"]["metadata"] = {"$ref": _OBJECT_META}
        schema["properties"]["apiVersion"] = {"const": f"{doc['group']}/{doc['version']}"}
        schema["properties"]["kind"] = {"const": doc["kind"]}
        schema.setdefault("required", [])
        schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata"})
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[(f"{doc['group']}/{doc['version']}", doc["kind"])] = jsonschema.Draft202012Validator(
            schema, registry=registry
        )
    return validators


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(object)"


def validate_object(obj: dict, crd_validators: dict) -> list[str]:
    """Error messages for one object ('' list when valid), each naming kind/name and the field."""
    api, kind = obj.get("apiVersion", "?"), obj.get("kind", "?")
    name = f"{kind}/{(obj.get('metadata') or {}).get('name', '?')}"
    validator = crd_validators.get((api, kind))
    if validator is not None:
        return [
            f"{name}: {_where(e)}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{name}: no schema for apiVersion {api} kind {kind}: neither Kubernetes {K8S_VERSION} "
            f"nor k8s/schemas/ has one"
        ]
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {_where(e)}: {e.message}"]
    return []


def validate_objects(objs: list[dict], crd_validators: dict | None = None) -> Iterator[str]:
    validators = load_crd_validators() if crd_validators is None else crd_validators
    for obj in objs:
        yield from validate_object(obj, validators)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    validators = load_crd_validators()
    failed = False
    for directory in argv:
        try:
            objs = render(directory)
        except RuntimeError as e:
            print(f"k8s/validate.py: error: {e}", file=sys.stderr)
            return 1
        errors = list(validate_objects(objs, validators))
        for line in errors:
            print(f"{directory}: {line}")
        failed |= bool(errors)
        print(f"{directory}: {len(objs)} objects, {'INVALID' if errors else 'valid'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
