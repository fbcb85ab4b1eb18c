"""Pipelines, versions and experiments of FakeKfpApiServer (healthz too), one method per
route, mirroring server/pipeline_upload_server.go, server/pipeline_server.go and
server/experiment_server.go of kubeflow/pipelines 2.17.0."""

from __future__ import annotations

import uuid
from email.parser import BytesParser
from email.policy import default as email_policy

import yaml

from support import fake_kfp_rules as rules
from support.fake_kfp_store import (
    Access,
    ApiError,
    Request,
    check_fields,
    display_name_filter,
    list_response,
    strip,
)

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 10x faster on 140 kB specs


class PipelinesApi(Access):
    """healthz, pipelines, versions and experiments."""

    # -- healthz: apiserver/main.go newHealthzResponse --------------------------------------
    def healthz(self, req: Request) -> dict:
        return {
            "commit_sha": "0123456789abcdef",
            "tag_name": self.tag_name,
            "multi_user": self.multi_user,
            "pipeline_store": "database",
        }

    # -- pipelines: server/pipeline_upload_server.go, server/pipeline_server.go -----------
    def _read_upload(self, req: Request) -> tuple[str, dict]:
        ctype = req.headers.get("content-type", "")
        msg = BytesParser(policy=email_policy).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + req.body
        )
        for part in msg.iter_parts() if msg.is_multipart() else []:
            if part.get_param("name", header="content-disposition") == "uploadfile":
                text = part.get_payload(decode=True).decode()
                try:
                    docs = [d for d in yaml.load_all(text, Loader=YAML_LOADER) if d]
                except yaml.YAMLError:
                    docs = []
                if not docs or not isinstance(docs[0], dict):
                    raise ApiError(400, "Failed to read a pipeline spec file")
                # server/api_util.go YamlStringToPipelineSpecStruct: with a platform spec
                # the stored spec is {"pipeline_spec": ..., "platform_spec": ...}.
                spec = docs[0]
                platform = next((d for d in docs[1:] if "platforms" in d), None)
                stored = {"pipeline_spec": spec, "platform_spec": platform} if platform else spec
                name = spec.get("pipelineInfo", {}).get("name", "")
                if not rules.PIPELINE_NAME.match(name):
                    raise ApiError(
                        400,
                        "pipeline's name must contain only lowercase alphanumeric characters "
                        "or '-' and must start with alphanumeric characters",
                    )
                return part.get_filename() or "", stored
        raise ApiError(400, "Failed to read pipeline from file")

    def _new_version(self, pipeline_id: str, name: str, req: Request, spec: dict) -> dict:
        if any(v["name"] == name for v in self.s.versions(pipeline_id)):
            # model/pipeline_version.go: unique index idx_pipelineid_name.
            raise ApiError(409, "Failed to create a pipeline version")
        sec, stamp = self.s.now()
        vid = str(uuid.uuid4())
        version = {
            "_id": vid,
            "_created": sec,
            "pipeline_id": pipeline_id,
            "pipeline_version_id": vid,
            "name": name,
            "display_name": req.arg("display_name") or name,
            "description": req.arg("description"),
            "created_at": stamp,
            "pipeline_spec": spec,
        }
        self.s.versions(pipeline_id).append(version)
        return version

    def _upload_authorize(self, req: Request, namespace: str, message: str) -> None:
        # pipeline_upload_server.go: an authorization failure is answered 400 with a bare
        # message, not 401/403 as the gRPC routes do.
        try:
            self.authorize(req, namespace, "create", "pipelines")
        except ApiError:
            raise ApiError(400, message) from None

    def upload_pipeline(self, req: Request) -> dict:
        filename, spec = self._read_upload(req)
        namespace = self.replace_namespace(req.arg("namespace"))
        self.namespace_required(namespace)
        if self.multi_user and namespace:  # canUploadVersionedPipeline: shared: no check
            self._upload_authorize(req, namespace, "Failed to create a pipeline")
        name = req.arg("name") or req.arg("display_name") or filename
        if any(
            p["name"] == name and p["namespace"] == namespace for p in self.s.pipelines.values()
        ):
            # model/pipeline.go: unique index namespace_name.
            raise ApiError(409, "Failed to create a pipeline and a pipeline version")
        sec, stamp = self.s.now()
        pid = str(uuid.uuid4())
        self.s.pipelines[pid] = {
            "_id": pid,
            "_created": sec,
            "pipeline_id": pid,
            "name": name,
            "display_name": req.arg("display_name") or name,
            "description": req.arg("description"),
            "namespace": namespace,
            "created_at": stamp,
            "versions": [],
        }
        self._new_version(pid, name, req, spec)
        return strip({k: v for k, v in self.s.pipelines[pid].items() if k != "versions"})

    def upload_version(self, req: Request) -> dict:
        filename, spec = self._read_upload(req)
        pid = req.arg("pipelineid")
        if pid not in self.s.pipelines:
            raise ApiError(400, "Failed to create a pipeline version")
        namespace = self.s.pipelines[pid]["namespace"]
        self.namespace_required(namespace)
        if self.multi_user and namespace:
            self._upload_authorize(req, namespace, "Failed to create a pipeline version")
        name = req.arg("name") or req.arg("display_name") or filename  # buildPipelineName
        version = self._new_version(pid, name, req, spec)
        return strip(version)

    def list_pipelines(self, req: Request) -> dict:
        # pipeline_server.go listPipelines: only the pipelines of the namespace asked for
        # (shared ones when none is given in multi-user mode).
        namespace = self.replace_namespace(req.arg("namespace"))
        self.namespace_required(namespace)
        self.pipeline_access(req, namespace, "list")
        name = display_name_filter(req)
        found = [
            p
            for p in self.s.pipelines.values()
            if p["namespace"] == namespace and name in (None, p["display_name"])
        ]
        return list_response(
            "pipelines",
            found,
            req,
            rules.PIPELINE_FIELDS,
            "Pipeline",
            lambda p: strip({k: v for k, v in p.items() if k != "versions"}),
        )

    def delete_pipeline(self, req: Request, pid: str) -> dict:
        if pid not in self.s.pipelines:
            raise ApiError(404, f"Pipeline {pid} not found")
        self.pipeline_access(req, self.s.pipelines[pid]["namespace"], "delete")
        # resource_manager.go DeletePipeline: versions go too only with cascade=true.
        if self.s.versions(pid) and req.arg("cascade") != "true":
            raise ApiError(400, f"Failed to delete pipeline {pid}: it has versions")
        del self.s.pipelines[pid]
        return {}

    def list_versions(self, req: Request, pid: str) -> dict:
        if pid not in self.s.pipelines:
            raise ApiError(404, f"Pipeline {pid} not found")
        self.pipeline_access(req, self.s.pipelines[pid]["namespace"], "list")
        versions = self.s.versions(pid)
        return list_response(
            "pipeline_versions", versions, req, rules.VERSION_FIELDS, "PipelineVersion"
        )

    # -- experiments: server/experiment_server.go ------------------------------------------
    def _experiment_access(self, req: Request, namespace: str, verb: str) -> None:
        # experiment_server.go canAccessExperiment
        if not self.multi_user:
            return
        if namespace == "":
            raise ApiError(400, "An experiment cannot have an empty namespace in multi-user mode")
        self.authorize(req, namespace, verb, "experiments")

    def create_experiment(self, req: Request | None, body: dict) -> dict:
        check_fields(body, "Experiment")
        namespace = self.replace_namespace(body.get("namespace", ""))
        if req is not None:
            self._experiment_access(req, namespace, "create")
        name = body.get("display_name", "")
        if any(
            e["display_name"] == name and e.get("namespace", "") == namespace
            for e in self.s.experiments.values()
        ):  # model/experiment.go: unique index idx_name_namespace
            raise ApiError(409, f"Experiment {name} already exists in namespace {namespace!r}")
        sec, stamp = self.s.now()
        eid = str(uuid.uuid4())
        self.s.experiments[eid] = {
            "_id": eid,
            "_created": sec,
            "experiment_id": eid,
            "display_name": name,
            "namespace": namespace,
            "created_at": stamp,
            "storage_state": "AVAILABLE",
        }
        return strip(self.s.experiments[eid])

    def list_experiments(self, req: Request) -> dict:
        namespace = self.replace_namespace(req.arg("namespace"))
        self._experiment_access(req, namespace, "list")
        name = display_name_filter(req)
        found = [
            e
            for e in self.s.experiments.values()
            if e.get("namespace", "") == namespace and name in (None, e["display_name"])
        ]
        return list_response("experiments", found, req, rules.EXPERIMENT_FIELDS, "Experiment")
