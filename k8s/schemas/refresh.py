"""Turn a CustomResourceDefinition YAML into the schema file k8s/validate.py reads.

    python k8s/schemas/refresh.py CRD.yaml --version v2beta1 --repo kubeflow/mpi-operator \
        --path manifests/base/kubeflow.org_mpijobs.yaml --commit SHA \
        --ref 'spec.mpiReplicaSpecs.*.template.spec=io.k8s.api.core.v1.PodSpec' \
        -o k8s/schemas/mpijob-v2beta1.schema.yaml

Keeps the version's openAPIV3Schema without `description`s. Each --ref replaces the subtree at a
dotted field path (`*` = any map key or list item) by a `$ref` to that Kubernetes definition in
kubernetes-validate's OpenAPI definitions: controller-gen copies core types such as PodSpec into
CRDs in full (hundreds of kB), and the Kubernetes schema of the same type is the better source.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"


def strip_descriptions(node: Any) -> Any:
    """A copy of a schema without `description` keywords (field names under `properties` stay)."""
    if isinstance(node, list):
        return [strip_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def substitute_ref(schema: dict, path: str, definition: str) -> None:
    """Replace, in place, every subtree at dotted `path` by a $ref to a Kubernetes definition."""
    nodes = [schema]
    for part in path.split("."):
        nxt = []
        for node in nodes:
            if part == "*":
                for child in ("additionalProperties", "items"):
                    if isinstance(node.get(child), dict):
                        nxt.append(node[child])
            elif part in node.get("properties", {}):
                nxt.append(node["properties"][part])
        if not nxt:
            raise KeyError(f"--ref path {path!r}: no field {part!r} in the schema")
        nodes = nxt
    for node in nodes:
        node.clear()
        node["$ref"] = f"{K8S_DEFINITIONS}#/$defs/{definition}"


def schema_document(crd: dict, version: str, source: dict, refs: dict[str, str]) -> dict:
    """The stored form: identity of the kind, where it came from, and its trimmed schema."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: kind={crd.get('kind')!r}")
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"version {version!r} not in the CRD; it has {sorted(versions)}")
    schema = strip_descriptions(versions[version]["schema"]["openAPIV3Schema"])
    for path, definition in refs.items():
        substitute_ref(schema, path, definition)
    return {
        "group": crd["spec"]["group"],
        "version": version,
        "kind": crd["spec"]["names"]["kind"],
        "source": source,
        "refs": refs,
        "openAPIV3Schema": schema,
    }


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_schema(path: str, doc: dict) -> None:
    header = (
        f"# {doc['kind']} ({doc['group']}/{doc['version']}): openAPIV3Schema of the CRD in "
        f"{doc['source']['repo']}, descriptions removed;\n"
        "# `refs` subtrees point into the Kubernetes OpenAPI definitions. Written by "
        "k8s/schemas/refresh.py (see k8s/README.md).\n"
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(header)
        yaml.dump(doc, f, Dumper=_NoAliases, sort_keys=False, width=100)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", help="the CRD YAML file (one document)")
    p.add_argument("--version", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--path", required=True, help="the CRD's path in --repo")
    p.add_argument("--commit", required=True)
    p.add_argument("--ref", action="append", default=[], metavar="FIELD.PATH=DEFINITION")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    refs = dict(r.split("=", 1) for r in a.ref)
    with open(a.crd) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    try:
        doc = schema_document(crd, a.version, {"repo": a.repo, "path": a.path, "commit": a.commit}, refs)
    except (KeyError, ValueError) as e:
        print(f"{a.crd}: {e}", file=sys.stderr)
        return 1
    write_schema(a.output, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
