"""Write the CRD schemas the manifest tests validate against (tests/support/schemas/*.json).

The tests install these as CRDs in a real API server (tests/support/kube_api.py, crds_from_schemas). This
copies each CRD version's ``openAPIV3Schema`` from the upstream CRD file, without the
descriptions. ``--prune-to`` keeps only the properties the given manifests use (the
InferenceService CRD is 2 MB, mostly the pod spec): every kept property keeps its whole
definition (type, enum, required, ...), and the tests reject any field the kept schema lacks,
so a field the CRD does not know still fails. Re-run it when a manifest starts using a new
field of a pruned CRD:

    python tests/support/schemas/vendor_crds.py istio-security.json <istio crd.yaml> \\
        --source "kubeflow/manifests common/istio/istio-crds/base/crd.yaml (Istio 1.29.1)" \\
        --crd authorizationpolicies.security.istio.io --crd peerauthentications.security.istio.io
    python tests/support/schemas/vendor_crds.py kserve-inferenceservice.json \\
        <kserve>/config/crd/full/serving.kserve.io_inferenceservices.yaml \\
        --source "kserve/kserve v0.20.0 config/crd/full/serving.kserve.io_inferenceservices.yaml" \\
        --crd inferenceservices.serving.kserve.io --prune-to manifests/examples/kserve
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def strip(schema):
    """The schema without descriptions (kept: everything that validates)."""
    if isinstance(schema, dict):
        return {k: strip(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [strip(v) for v in schema]
    return schema


def prune(schema: dict, instances: list) -> dict:
    """``schema`` reduced to the properties some instance uses, recursively."""
    schema = dict(schema)
    objects = [i for i in instances if isinstance(i, dict)]
    if "properties" in schema and objects:
        used = {k for o in objects for k in o}
        schema["properties"] = {
            k: prune(v, [o[k] for o in objects if k in o])
            for k, v in schema["properties"].items()
            if k in used
        }
    elif isinstance(schema.get("additionalProperties"), dict) and objects:
        values = [v for o in objects for v in o.values()]
        schema["additionalProperties"] = prune(schema["additionalProperties"], values)
    if "items" in schema:
        items = [v for i in instances if isinstance(i, list) for v in i]
        schema["items"] = prune(schema["items"], items)
    return schema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="file name under tests/support/schemas/")
    ap.add_argument("crd_file")
    ap.add_argument("--source", required=True, help="where the CRD file comes from")
    ap.add_argument("--crd", action="append", required=True, help="CRD name (plural.group)")
    ap.add_argument("--prune-to", help="kustomize folder whose objects the schema is cut to")
    args = ap.parse_args()

    with open(args.crd_file) as f:
        crds = {d["metadata"]["name"]: d for d in yaml.safe_load_all(f) if d}
    used = []
    if args.prune_to:
        out = subprocess.run(
            ["kubectl", "kustomize", args.prune_to], check=True, capture_output=True, text=True
        ).stdout
        used = [d for d in yaml.safe_load_all(out) if d]
    result = {"source": args.source, "pruned_to": args.prune_to or "", "kinds": {}}
    for name in args.crd:
        crd = crds[name]
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strip(version["schema"]["openAPIV3Schema"])
            if args.prune_to:
                api = f"{group}/{version['name']}"
                mine = [d for d in used if d["kind"] == kind and d["apiVersion"] == api]
                schema = prune(schema, mine)
            result["kinds"][f"{group}/{version['name']}/{kind}"] = schema
    (HERE / args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
