"""The KFP backend's driver, as far as the tests need it: a task's resolved inputs and its cache
key, computed from the compiled YAML the way the backend computes them.

Ported from kubeflow/pipelines 2.14-2.17 (read at tag 2.17.0):

* ``backend/src/v2/driver/resolve.go`` ``resolveInputs``/``resolveInputParameter``: a task's
  inputs are its ``inputs.parameters``/``artifacts`` resolved in the parent DAG's scope
  (``componentInputParameter``), from upstream outputs (``taskOutputParameter``) or as
  constants, where ``{{$.pipeline_job_uuid}}`` and friends become run values.
* ``backend/src/v2/driver/cache.go`` ``getFingerPrint``: the container's command + args as the
  IR holds them (unresolved), its image and, from 2.17, the sorted PVC names it mounts.
* ``backend/src/v2/cacheutils/cache.go`` ``GenerateCacheKey``/``GenerateFingerPrint``: every
  input parameter *value*, input artifact *names* (MLMD names: a cache hit reuses the cached
  execution's artifacts, so a cached producer hands on the same name), output artifact
  name/type/metadata with the URI wiped, output parameter types; sha256 of the JSON.

The JSON here is Python's, not Go's protojson: digests are compared between simulated runs,
never against a digest a real backend printed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# resolve.go resolveInputParameter, RuntimeValue constants.
PLACEHOLDERS = {
    "{{$.pipeline_job_uuid}}": "run_id",
    "{{$.pipeline_job_name}}": "display_name",
    "{{$.pipeline_job_resource_name}}": "resource_name",
    "{{$.pipeline_job_create_time_utc}}": "create_time",
    "{{$.pipeline_job_schedule_time_utc}}": "create_time",
}


@dataclass
class BackendRun:
    """One simulated run of a compiled pipeline.

    Attributes:
        spec: The pipeline spec (first YAML document).
        platform: The kubernetes platform spec (second document), or {}.
        params: Runtime parameters as the API server would pass them.
        run_id: The run's UUID (what ``{{$.pipeline_job_uuid}}`` resolves to).
        outputs: ``{task: {output parameter: value}}`` that upstream tasks produced in this run.
        artifacts: ``{task: {output artifact: MLMD artifact name}}`` of upstream tasks.
        iteration: Which iteration of a ``dsl.ParallelFor`` the task runs in.
    """

    spec: dict
    platform: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    run_id: str = "run-1"
    outputs: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    iteration: int = 0

    @property
    def display_name(self) -> str:
        return f"display-{self.run_id}"

    resource_name = display_name

    @property
    def create_time(self) -> str:
        return f"time-of-{self.run_id}"

    def _path(self, task: str) -> list[tuple[dict, dict]]:
        """``[(DAG component, task spec), ...]`` from the root down to ``task``."""

        def walk(comp: dict, trail: list) -> list | None:
            for name, t in comp.get("dag", {}).get("tasks", {}).items():
                here = trail + [(comp, t)]
                if name == task:
                    return here
                child = self.spec["components"][t["componentRef"]["name"]]
                if "dag" in child:
                    found = walk(child, here)
                    if found:
                        return found
            return None

        path = walk(self.spec["root"], [])
        if path is None:
            raise KeyError(f"no task {task!r} in the pipeline")
        return path

    def _value(self, spec: dict, scope: dict) -> Any:
        if "componentInputParameter" in spec:
            return scope[spec["componentInputParameter"]]
        if "taskOutputParameter" in spec:
            out = spec["taskOutputParameter"]
            task, key = out["producerTask"], out["outputParameterKey"]
            # An output the test did not give: a value of this run alone.
            return self.outputs.get(task, {}).get(key, f"{task}.{key} of {self.run_id}")
        if "runtimeValue" in spec:
            constant = spec["runtimeValue"]["constant"]
            if isinstance(constant, str) and constant in PLACEHOLDERS:
                return getattr(self, PLACEHOLDERS[constant])
            return constant
        raise NotImplementedError(f"input spec {spec}")

    def _artifact(self, spec: dict, scope: dict) -> list[str]:
        if "componentInputArtifact" in spec:
            return scope[spec["componentInputArtifact"]]
        out = spec["taskOutputArtifact"]
        task, key = out["producerTask"], out["outputArtifactKey"]
        return [self.artifacts.get(task, {}).get(key, f"artifact {task}.{key} of {self.run_id}")]

    def _scopes(self, task: str) -> list[tuple[dict, dict]]:
        """The resolved ``(parameters, artifacts)`` of the root and of every task on the path
        to ``task``: a DAG's are the scope its own tasks resolve in."""
        root = self.spec["root"].get("inputDefinitions", {}).get("parameters", {})
        scope = {k: d.get("defaultValue") for k, d in root.items()}
        scope.update(self.params)
        arts: dict = {}
        out = [(scope, arts)]
        for _, t in self._path(task):
            ins = t.get("inputs", {})
            values = {k: self._value(v, scope) for k, v in ins.get("parameters", {}).items()}
            names = {k: self._artifact(v, arts) for k, v in ins.get("artifacts", {}).items()}
            loop = t.get("parameterIterator")
            if loop:  # resolve.go: the iteration's DAG gets items[iteration_index] as its item
                items = values[loop["items"]["inputParameter"]]
                values[loop["itemInput"]] = (
                    json.loads(items) if isinstance(items, str) else items
                )[self.iteration]
            scope, arts = values, names
            out.append((scope, arts))
        return out

    def inputs(self, task: str) -> tuple[dict, dict]:
        """``(parameter values, artifact names)`` of ``task``'s executor input."""
        return self._scopes(task)[-1]

    def k8s_value(self, task: str, spec: dict) -> Any:
        """A kubernetes-config input (``nodeSelectorJson``, ``tolerationJson``) of ``task``:
        the driver resolves it in the parent DAG's inputs (driver/container.go passes
        ``dag.Execution.GetParameters()`` to ``extendPodSpecPatch``; driver/resolve.go
        ``resolveK8sJsonParameter``), not in the task's own."""
        return self._value(spec, self._scopes(task)[-2][0])

    def resource(self, task: str, value: str) -> str:
        """A container resource field (e.g. the accelerator type): a placeholder
        ``{{$.inputs.parameters['x']}}`` resolves from the task's own inputs
        (driver/resolve.go ``resolvePodSpecInputRuntimeParameter``)."""
        prefix, suffix = "{{$.inputs.parameters['", "']}}"
        if value.startswith(prefix) and value.endswith(suffix):
            return self.inputs(task)[0][value[len(prefix) : -len(suffix)]]
        return value

    def component(self, task: str) -> dict:
        return self.spec["components"][self._path(task)[-1][1]["componentRef"]["name"]]

    def caching_enabled(self, task: str) -> bool:
        return bool(self._path(task)[-1][1].get("cachingOptions", {}).get("enableCache"))

    def cache_key(self, task: str) -> dict:
        """The ``CacheKey`` message of ``task`` as a dict (cacheutils/cache.go)."""
        comp = self.component(task)
        values, names = self.inputs(task)
        container = self.spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
        k8s = (
            self.platform.get("deploymentSpec", {})
            .get("executors", {})
            .get(comp["executorLabel"], {})
        )
        outs = comp.get("outputDefinitions", {})
        return {
            "inputArtifactNames": {k: {"artifactNames": v} for k, v in names.items()},
            "inputParameterValues": values,
            "outputArtifactsSpec": {
                k: {"type": v["artifactType"], "metadata": {}}
                for k, v in outs.get("artifacts", {}).items()
            },
            "outputParametersSpec": {
                k: v["parameterType"] for k, v in outs.get("parameters", {}).items()
            },
            "containerSpec": {
                "image": container["image"],
                "cmdArgs": [*container.get("command", []), *container.get("args", [])],
                "pvcNames": sorted({m.get("constant", "") for m in k8s.get("pvcMount", [])}),
            },
        }

    def fingerprint(self, task: str) -> str:
        """sha256 of the cache key's JSON (GenerateFingerPrint): equal means a cache hit."""
        data = json.dumps(self.cache_key(task), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()
