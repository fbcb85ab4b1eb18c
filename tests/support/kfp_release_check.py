"""Parse compiled pipelines with one KFP release's own protos, as its API server does.

Run as a script in a fresh process (each release's generated protos register the same
``.proto`` file names, so two releases cannot share a process):

    python kfp_release_check.py RELEASE_DIR PIPELINE.yaml [...]

``RELEASE_DIR`` holds that release's ``kfp/pipeline_spec/pipeline_spec_pb2.py`` and
``kfp/kubernetes/kubernetes_executor_config_pb2.py``, taken from the PyPI wheels
``kfp-pipeline-spec==R`` and ``kfp-kubernetes==R``. They are generated from the same
``api/v2alpha1/pipeline_spec.proto`` and ``kubernetes_platform/proto/
kubernetes_executor_config.proto`` that the Go backend of release R is built from.

Prints one JSON object: ``{pipeline path: [errors]}``. The steps, each from
kubeflow/pipelines ``backend/src``:

* upload and run creation, ``apiserver/template/v2_template.go`` ``NewV2SpecTemplate``: every
  YAML document is the pipeline spec (``protojson.Unmarshal`` into ``PipelineSpec``, strict)
  or a platform spec with a ``kubernetes`` entry (strict ``PlatformSpec``); schema version
  2.1.0, a pipeline name matching the DNS-1123 pattern, a root component;
* run creation, ``v2/compiler/visitor.go`` ``GetDeploymentConfig``: the deployment spec as a
  ``PipelineDeploymentConfig`` with ``DiscardUnknown: true``;
* run creation, ``v2/compiler/argocompiler/container.go`` ``containerExecutorTask``: each
  executor's Kubernetes config as a ``KubernetesExecutorConfig``, strict (unknown fields are
  an error: protojson's default, and json_format.Parse's).
"""

from __future__ import annotations

import json
import re
import sys

import yaml


def check(path: str, spec_pb2, k8s_pb2, json_format) -> list[str]:
    """The errors release R's API server would answer for the pipeline at ``path``."""
    errors: list[str] = []
    spec = platform = None
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        if "pipelineInfo" in doc:  # isPipelineSpec: the document has pipelineInfo
            spec = spec_pb2.PipelineSpec()
            try:
                json_format.Parse(json.dumps(doc), spec)
            except json_format.ParseError as e:
                errors.append(f"invalid v2 pipeline spec: {e}")
                continue
            if spec.schema_version != "2.1.0":
                errors.append(f"KFP only supports schema version 2.1.0, not {spec.schema_version}")
            if not re.search(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec.pipeline_info.name):
                errors.append("invalid v2 pipeline spec: name")
            if not spec.HasField("root"):
                errors.append("invalid v2 pipeline spec: root component is empty")
        elif "kubernetes" in (doc.get("platforms") or {}):
            platform = spec_pb2.PlatformSpec()
            try:
                json_format.Parse(json.dumps(doc), platform)
            except json_format.ParseError as e:
                errors.append(f"cannot unmarshal platform specific configs: {e}")
    if spec is None:
        return errors + ["no pipeline spec is provided"]
    deploy = spec_pb2.PipelineDeploymentConfig()
    as_json = json_format.MessageToJson(spec.deployment_spec)
    json_format.Parse(as_json, deploy, ignore_unknown_fields=True)
    if platform is None:
        return errors
    single = platform.platforms["kubernetes"]
    executors = json.loads(json_format.MessageToJson(single.deployment_spec)).get("executors", {})
    for name, config in sorted(executors.items()):
        try:
            json_format.Parse(json.dumps(config), k8s_pb2.KubernetesExecutorConfig())
        except json_format.ParseError as e:
            errors.append(f"{name}: failed to unmarshal kubernetes config: {e}")
    return errors


def main(release_dir: str, paths: list[str]) -> None:
    # The release's generated code shadows the installed kfp (a regular package first on the
    # path); google.protobuf stays the installed runtime.
    sys.path.insert(0, release_dir)
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2 as spec_pb2

    print(json.dumps({p: check(p, spec_pb2, k8s_pb2, json_format) for p in paths}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
