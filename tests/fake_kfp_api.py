"""FakeKfpApiServer: a loopback HTTP server answering the KFP v2beta1 REST calls this project
makes the way the Kubeflow Pipelines 2.17 API server does.

It keeps pipelines, versions, experiments, runs and recurring runs, records every request,
and refuses what the real server refuses: single-user or multi-user mode (``multi_user``);
in multi-user mode a caller needs an identity and may use only its own namespaces, and runs,
recurring runs and experiments need one; run parameters are checked against the pipeline
spec's root inputs; cron, ``max_concurrency`` and ``sort_by`` are validated; recurring runs
without a version id follow the latest version. Each rule cites the Go file of
kubeflow/pipelines 2.17.0 it mirrors (paths under ``backend/src/``); the pure rules live in
``fake_kfp_rules.py``. A route the project does not use answers 404 rather than guessing.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fake_kfp_rules as rules
import yaml

V2 = "/apis/v2beta1"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 10x faster on 140 kB specs
# gRPC code of each HTTP status the gateway maps (grpc-gateway runtime.HTTPStatusFromCode).
GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}
# Top-level fields of each request message (backend/api/v2beta1/*.proto); the gateway's
# unmarshaler has DiscardUnknown=false (apiserver/common/utils.go CustomMarshaler), so any
# other field is refused.
FIELDS = {
    "Run": "experiment_id run_id display_name storage_state description pipeline_version_id "
    "pipeline_spec pipeline_version_reference runtime_config service_account created_at "
    "scheduled_at finished_at state error run_details recurring_run_id state_history "
    "plugins_input plugins_output",
    "RecurringRun": "recurring_run_id display_name description pipeline_version_id "
    "pipeline_spec pipeline_version_reference runtime_config service_account max_concurrency "
    "trigger mode created_at updated_at status error no_catchup namespace experiment_id "
    "plugins_input",
    "Experiment": "experiment_id display_name description created_at namespace storage_state "
    "last_run_created_at",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: bytes
    headers: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.body or b"{}")

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]


@dataclass
class State:
    pipelines: dict = field(default_factory=dict)  # id -> api dict + "versions": [api dicts]
    experiments: dict = field(default_factory=dict)  # id -> api dict
    runs: list = field(default_factory=list)
    recurring: dict = field(default_factory=dict)  # id -> api dict
    requests: list = field(default_factory=list)
    clock: itertools.count = field(default_factory=lambda: itertools.count(1_767_225_600))

    def now(self) -> tuple[int, str]:
        """A strictly increasing CreatedAtInSec and its RFC 3339 form."""
        import datetime

        sec = next(self.clock)
        stamp = datetime.datetime.fromtimestamp(sec, datetime.timezone.utc)
        return sec, stamp.strftime("%Y-%m-%dT%H:%M:%SZ")

    def versions(self, pipeline_id: str) -> list[dict]:
        return self.pipelines[pipeline_id]["versions"]

    def version(self, version_id: str) -> dict:
        for p in self.pipelines.values():
            for v in p["versions"]:
                if v["pipeline_version_id"] == version_id:
                    return v
        raise ApiError(404, f"PipelineVersion {version_id} not found")

    def latest_version(self, pipeline_id: str) -> dict:
        # storage/pipeline_store.go GetLatestPipelineVersion: ORDER BY CreatedAtInSec DESC.
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"Pipeline {pipeline_id} not found")
        versions = self.versions(pipeline_id)
        if not versions:
            raise ApiError(404, f"PipelineVersion {pipeline_id} not found")
        return max(versions, key=lambda v: v["_created"])


def _strip(obj: dict) -> dict:
    """The API form: no private keys, no empty fields (protojson EmitUnpopulated=false)."""
    return {k: v for k, v in obj.items() if not k.startswith("_") and v not in ("", None, [])}


def _sorted_page(items: list[dict], req: Request, fields: dict, model: str) -> tuple[list, str]:
    # list/list.go NewOptions (sort_by) and validatePageSize; ties break on the key (UUID).
    key, desc = rules.list_options(req.arg("sort_by"), fields, model)
    size = rules.page_size(req.arg("page_size"))
    col = {"CreatedAtInSec": "_created", "UpdatedAtInSec": "_created", "UUID": "_id"}.get(key)
    if col is None:  # DisplayName -> display_name; an experiment's Name is its display_name
        col = (
            "display_name"
            if model == "Experiment"
            else re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
        )
    ordered = sorted(items, key=lambda o: (o.get(col, ""), o["_id"]), reverse=desc)
    start = int(req.arg("page_token") or 0)
    rest = ordered[start + size :]
    return ordered[start : start + size], str(start + size) if rest else ""


def _display_name_filter(req: Request) -> str | None:
    """The one filter the client sends: display_name EQUALS a string (apiserver/filter)."""
    raw = req.arg("filter")
    if not raw:
        return None
    preds = json.loads(raw).get("predicates", [])
    ok = len(preds) == 1 and preds[0].get("key") in ("display_name", "name")
    op = preds[0].get("operation") if ok else None
    if not ok or op not in ("EQUALS", 1):
        raise NotImplementedError(f"FakeKfpApiServer: filter {raw}")
    return preds[0].get("string_value", preds[0].get("stringValue"))


class Api:
    """The server's behaviour, one method per route, independent of HTTP."""

    def __init__(
        self,
        state: State,
        *,
        multi_user: bool,
        version: str,
        user_namespaces,
        require_namespace: bool,
        kfp_namespace: str,
    ):
        self.s = state
        self.multi_user = multi_user
        self.tag_name = version
        self.user_namespaces = set(user_namespaces)
        self.require_namespace = require_namespace
        self.kfp_namespace = kfp_namespace
        self.behind_kube_proxy = False  # True: reachable only through the kube API proxy

    # -- identity and namespaces ---------------------------------------------------------
    def replace_namespace(self, namespace: str) -> str:
        # resource/resource_manager.go ReplaceNamespace: single-user mode has no namespaces.
        return namespace if self.multi_user else ""

    def authorize(self, req: Request, namespace: str, verb: str, resource: str) -> None:
        # resource/resource_manager.go IsAuthorized: an identity (a bearer token through
        # TokenReview, or the kubeflow-userid header), then a SubjectAccessReview on the
        # namespace; a profile user may act in its own namespaces only.
        if not self.multi_user:
            return
        auth = req.headers.get("authorization", "")
        user = auth.removeprefix("Bearer ").strip() or req.headers.get("kubeflow-userid", "")
        if not user:
            raise ApiError(
                401,
                "Failed to check authorization. User identity is empty in the request header",
            )
        if namespace not in self.user_namespaces:
            raise ApiError(
                403,
                f"User is not authorized with reason: no RBAC for {verb} {resource} "
                f"(request: namespace {namespace!r})",
            )

    def pipeline_access(self, req: Request, namespace: str, verb: str) -> None:
        # server/pipeline_server.go canAccessPipeline: reads of shared (namespace-less)
        # pipelines are open; writes on them are authorized against the KFP namespace.
        if not self.multi_user:
            return
        if namespace == "":
            if verb in ("get", "list"):
                return
            namespace = self.kfp_namespace
        self.authorize(req, namespace, verb, "pipelines")

    def namespace_required(self, namespace: str) -> None:
        # apiserver/validation/namespace.go ValidateNamespaceRequired (2.15+): only with
        # REQUIRE_NAMESPACE_FOR_PIPELINES=true (default false).
        if self.multi_user and self.require_namespace and namespace == "":
            raise ApiError(400, "Namespace is required for pipeline operations")

    def experiment_namespace(self, experiment_id: str, namespace: str = "") -> tuple[str, str]:
        # resource/resource_manager.go GetValidExperimentNamespacePair.
        if self.multi_user and not experiment_id:
            raise ApiError(400, "Experiment id can not be empty in multi-user mode")
        if not experiment_id:
            default = next(
                (e for e in self.s.experiments.values() if e["display_name"] == "Default"), None
            ) or self.create_experiment(None, {"display_name": "Default"})
            return default["experiment_id"], namespace
        if experiment_id not in self.s.experiments:
            raise ApiError(404, f"Experiment {experiment_id} not found")
        ns = self.s.experiments[experiment_id].get("namespace", "")
        if namespace and namespace != ns:
            raise ApiError(
                400,
                f"Experiment {experiment_id} belongs to namespace '{ns}' instead of '{namespace}'",
            )
        return experiment_id, ns

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

    def upload_pipeline(self, req: Request) -> dict:
        filename, spec = self._read_upload(req)
        namespace = self.replace_namespace(req.arg("namespace"))
        self.namespace_required(namespace)
        if self.multi_user and namespace:  # canUploadVersionedPipeline: shared: no check
            self.authorize(req, namespace, "create", "pipelines")
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
        return _strip({k: v for k, v in self.s.pipelines[pid].items() if k != "versions"})

    def upload_version(self, req: Request) -> dict:
        filename, spec = self._read_upload(req)
        pid = req.arg("pipelineid")
        if pid not in self.s.pipelines:
            raise ApiError(400, "Failed to create a pipeline version")
        namespace = self.s.pipelines[pid]["namespace"]
        self.namespace_required(namespace)
        if self.multi_user and namespace:
            self.authorize(req, namespace, "create", "pipelines")
        name = req.arg("name") or req.arg("display_name") or filename  # buildPipelineName
        version = self._new_version(pid, name, req, spec)
        return _strip(version)

    def list_pipelines(self, req: Request) -> dict:
        # pipeline_server.go listPipelines: only the pipelines of the namespace asked for
        # (shared ones when none is given in multi-user mode).
        namespace = self.replace_namespace(req.arg("namespace"))
        self.namespace_required(namespace)
        self.pipeline_access(req, namespace, "list")
        name = _display_name_filter(req)
        found = [
            p
            for p in self.s.pipelines.values()
            if p["namespace"] == namespace and name in (None, p["display_name"])
        ]
        page, token = _sorted_page(found, req, rules.PIPELINE_FIELDS, "Pipeline")
        out = [_strip({k: v for k, v in p.items() if k != "versions"}) for p in page]
        return _strip({"pipelines": out, "total_size": len(found), "next_page_token": token})

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
        page, token = _sorted_page(versions, req, rules.VERSION_FIELDS, "PipelineVersion")
        return _strip(
            {
                "pipeline_versions": [_strip(v) for v in page],
                "total_size": len(versions),
                "next_page_token": token,
            }
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
        _check_fields(body, "Experiment")
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
        return _strip(self.s.experiments[eid])

    def list_experiments(self, req: Request) -> dict:
        namespace = self.replace_namespace(req.arg("namespace"))
        self._experiment_access(req, namespace, "list")
        name = _display_name_filter(req)
        found = [
            e
            for e in self.s.experiments.values()
            if e.get("namespace", "") == namespace and name in (None, e["display_name"])
        ]
        page, token = _sorted_page(found, req, rules.EXPERIMENT_FIELDS, "Experiment")
        return _strip(
            {
                "experiments": [_strip(e) for e in page],
                "total_size": len(found),
                "next_page_token": token,
            }
        )

    # -- runs: server/run_server.go createRun, resource/resource_manager.go CreateRun -------
    def _resolve_version(self, ref: dict | None) -> dict:
        # resource_manager.go fetchPipelineVersionFromPipelineSpec: a version id wins (and
        # must belong to the pipeline id); a pipeline id alone means its latest version.
        ref = ref or {}
        pid, vid = ref.get("pipeline_id", ""), ref.get("pipeline_version_id", "")
        if vid:
            version = self.s.version(vid)
            if pid and version["pipeline_id"] != pid:
                raise ApiError(
                    400,
                    f"Pipeline version {vid} belongs to pipeline {version['pipeline_id']} "
                    f"(not {pid})",
                )
            return version
        if pid:
            return self.s.latest_version(pid)
        raise NotImplementedError("FakeKfpApiServer: runs from an inline pipeline_spec")

    def create_run(self, req: Request | None, body: dict) -> dict:
        _check_fields(body, "Run")
        if body.get("plugins_output") is not None:
            raise ApiError(400, "plugins_output is server-owned")
        if not body.get("display_name"):
            raise ApiError(400, "The run name is empty. Please specify a valid name")
        eid, namespace = self.experiment_namespace(body.get("experiment_id", ""))
        if self.multi_user and namespace == "":
            raise ApiError(400, "A run cannot have an empty namespace in multi-user mode")
        if req is not None:  # run_server.go canAccessRun
            self.authorize(req, namespace, "create", "runs")
        version = self._resolve_version(body.get("pipeline_version_reference"))
        _check_params(version, body.get("runtime_config"))
        sec, stamp = self.s.now()
        run = {
            **body,
            "_id": str(uuid.uuid4()),
            "_created": sec,
            "_namespace": namespace,
            "experiment_id": eid,
            "created_at": stamp,
            "state": "PENDING",
            "pipeline_version_reference": {
                "pipeline_id": version["pipeline_id"],
                "pipeline_version_id": version["pipeline_version_id"],
            },
        }
        run["run_id"] = run["_id"]
        self.s.runs.append(run)
        return _strip(run)

    # -- recurring runs: server/job_server.go, api_converter.go toModelJob -------------------
    def _job_access(self, req: Request, namespace: str, verb: str) -> None:
        # job_server.go canAccessJob
        if not self.multi_user:
            return
        if namespace == "":
            raise ApiError(400, "a recurring run cannot have an empty namespace in multi-user mode")
        self.authorize(req, namespace, verb, "jobs")

    def create_recurring_run(self, req: Request, body: dict) -> dict:
        _check_fields(body, "RecurringRun")
        if not body.get("display_name"):
            raise ApiError(500, "Recurring run's name cannot be empty")
        trigger = body.get("trigger") or {}
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        interval = (trigger.get("periodic_schedule") or {}).get("interval_second")
        max_concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= max_concurrency <= 10:
            raise ApiError(
                400,
                "Max concurrency of a recurring run must be at least 1 and at most 10. "
                f"Received {max_concurrency}",
            )
        if cron is not None:
            try:
                rules.parse_cron(cron)
            except rules.RuleError as exc:
                raise ApiError(
                    400,
                    "Schedule cron is not a supported format(https://godoc.org/github.com/"
                    f"robfig/cron). Error: {exc}",
                ) from None
        if interval is not None and int(interval) < 1:
            raise ApiError(400, f"Found invalid period schedule interval {interval}")
        eid, namespace = self.experiment_namespace(
            body.get("experiment_id", ""), self.replace_namespace(body.get("namespace", ""))
        )
        if self.multi_user and namespace == "":
            raise ApiError(400, "Recurring run cannot have an empty namespace in multi-user mode")
        self._job_access(req, namespace, "create")
        # resource_manager.go CreateJob: a version id pins the recurring run; a pipeline id
        # alone is validated on the latest version and left unpinned, so each triggered run
        # takes the latest version of that moment.
        ref = body.get("pipeline_version_reference") or {}
        if not ref.get("pipeline_version_id") and not ref.get("pipeline_id"):
            raise ApiError(500, "Cannot create a job with an empty pipeline ID")
        _check_params(self._resolve_version(ref), body.get("runtime_config"))
        sec, stamp = self.s.now()
        enabled = body.get("mode", "ENABLE") in ("ENABLE", 1)
        rid = str(uuid.uuid4())
        rr = {
            **body,
            "_id": rid,
            "_created": sec,
            "recurring_run_id": rid,
            "experiment_id": eid,
            "namespace": namespace,
            "created_at": stamp,
            "max_concurrency": str(max_concurrency),  # int64: a JSON string in protojson
            "mode": "ENABLE" if enabled else "DISABLE",
            "status": "ENABLED" if enabled else "DISABLED",
        }
        self.s.recurring[rid] = rr
        return _strip(rr)

    def list_recurring_runs(self, req: Request) -> dict:
        # job_server.go listJobs: the namespace (or the experiment's) must be given and
        # authorized in multi-user mode; only that namespace's recurring runs come back.
        namespace = self.replace_namespace(req.arg("namespace"))
        eid = req.arg("experiment_id")
        if eid:
            _, namespace = self.experiment_namespace(eid)
        self._job_access(req, namespace, "list")
        found = [
            r
            for r in self.s.recurring.values()
            if (r["experiment_id"] == eid if eid else r.get("namespace", "") == namespace)
        ]
        page, token = _sorted_page(found, req, rules.JOB_FIELDS, "Job")
        # recurring_run.proto names this field recurringRuns (no snake_case proto name).
        return _strip(
            {
                "recurringRuns": [_strip(r) for r in page],
                "total_size": len(found),
                "next_page_token": token,
            }
        )

    def change_recurring_run(self, req: Request, rid: str, action: str) -> dict:
        if rid not in self.s.recurring:
            raise ApiError(404, f"RecurringRun {rid} not found")
        rr = self.s.recurring[rid]
        self._job_access(req, rr.get("namespace", ""), action or "delete")
        if action == "":
            del self.s.recurring[rid]
        else:
            on = action == "enable"
            rr.update(mode="ENABLE" if on else "DISABLE", status="ENABLED" if on else "DISABLED")
        return {}

    def fire(self, recurring_run_id: str) -> dict:
        """What the ScheduledWorkflow controller does when the cron fires: CreateRun with the
        recurring run's pipeline id and (possibly empty) version id
        (crd/controller/scheduledworkflow/controller.go submitNewWorkflowIfNotAlreadySubmitted)."""
        rr = self.s.recurring[recurring_run_id]
        body = {
            "experiment_id": rr["experiment_id"],
            "display_name": f"{rr['display_name']}-{len(self.s.runs)}",
            "recurring_run_id": recurring_run_id,
            "runtime_config": rr.get("runtime_config"),
            "pipeline_version_reference": rr.get("pipeline_version_reference"),
            "service_account": rr.get("service_account"),
        }
        return self.create_run(None, {k: v for k, v in body.items() if v is not None})


def _check_fields(body: dict, message: str) -> None:
    allowed = FIELDS[message].split()
    camel = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), f) for f in allowed}
    unknown = [k for k in body if k not in allowed and k not in camel]
    if unknown:
        raise ApiError(400, f'proto: (line 1:2): unknown field "{unknown[0]}"')


def _check_params(version: dict, runtime_config: dict | None) -> None:
    try:
        rules.check_runtime_parameters(
            rules.root_parameters(version["pipeline_spec"]), runtime_config
        )
    except rules.RuleError as exc:
        raise ApiError(400, f"Failed to create a run: Invalid input error: {exc}") from None


ROUTES = [  # (method, path pattern, Api method); path groups become arguments
    ("GET", rf"{V2}/healthz", "healthz"),
    ("POST", rf"{V2}/pipelines/upload", "upload_pipeline"),
    ("POST", rf"{V2}/pipelines/upload_version", "upload_version"),
    ("GET", rf"{V2}/pipelines", "list_pipelines"),
    ("DELETE", rf"{V2}/pipelines/([^/]+)", "delete_pipeline"),
    ("GET", rf"{V2}/pipelines/([^/]+)/versions", "list_versions"),
    ("GET", rf"{V2}/experiments", "list_experiments"),
    ("POST", rf"{V2}/experiments", "create_experiment"),
    ("POST", rf"{V2}/runs", "create_run"),
    ("POST", rf"{V2}/recurringruns", "create_recurring_run"),
    ("GET", rf"{V2}/recurringruns", "list_recurring_runs"),
    ("POST", rf"{V2}/recurringruns/([^/:]+):(enable|disable)", "change_recurring_run"),
    ("DELETE", rf"{V2}/recurringruns/([^/:]+)()", "change_recurring_run"),
]
KUBE_PROXY = re.compile(r"/api/v1/namespaces/([^/]+)/services/ml-pipeline:http/proxy/*(/.*)")
JSON_BODY = {"create_experiment", "create_run", "create_recurring_run"}
UPLOADS = {"upload_pipeline", "upload_version"}


def _kube_status(code: int, message: str) -> bytes:
    return json.dumps(
        {"kind": "Status", "status": "Failure", "message": message, "code": code}
    ).encode()


class Handler(BaseHTTPRequestHandler):
    api: Api

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, data: bytes, ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        url = urllib.parse.urlparse(self.path)
        req = Request(
            self.command,
            url.path,
            urllib.parse.parse_qs(url.query),
            self.rfile.read(int(self.headers.get("Content-Length") or 0)),
            {k.lower(): v for k, v in self.headers.items()},
        )
        self.api.s.requests.append(req)
        path = req.path
        proxied = KUBE_PROXY.fullmatch(path)
        if proxied:
            # kfp.Client without a host goes through the kube API server's service proxy
            # (kfp/client/client.py _KUBE_PROXY_PATH) to ml-pipeline in the namespace it was
            # given; the Service lives where KFP is installed (manifests/kustomize/base).
            namespace, path = proxied.groups()
            if not req.headers.get("authorization"):
                return self._send(401, _kube_status(401, "Unauthorized"))
            if namespace != self.api.kfp_namespace:
                return self._send(404, _kube_status(404, 'services "ml-pipeline" not found'))
            # k8s.io/apiserver/pkg/endpoints/filters/authentication.go: once the kube API
            # server has authenticated a request it deletes the Authorization header, so
            # KFP behind the proxy never sees the caller's token.
            req.headers.pop("authorization")
        elif self.api.behind_kube_proxy:  # the kube API server has no /apis/v2beta1 routes
            return self._send(
                404, _kube_status(404, "the server could not find the requested resource")
            )
        for method, pattern, route in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method == self.command:
                name = route
                break
        else:
            return self._send(404, b'{"code": 5, "message": "Not Found"}')
        try:
            fn = getattr(self.api, name)
            out = fn(req, req.json()) if name in JSON_BODY else fn(req, *m.groups())
            return self._send(200, json.dumps(out).encode())
        except rules.RuleError as exc:
            err = ApiError(400, str(exc))
        except ApiError as exc:
            err = exc
        if name in UPLOADS:
            # pipeline_upload_server.go: writeErrorToResponse (apiv1beta1.Error JSON) or,
            # for validation errors, http.Error (plain text).
            if err.message.startswith("Namespace is required"):
                return self._send(err.status, (err.message + "\n").encode(), "text/plain")
            body = {"error_message": err.message, "error_details": err.message}
        else:  # grpc-gateway: a google.rpc.Status
            body = {"code": GRPC_CODE[err.status], "message": err.message, "details": []}
        return self._send(err.status, json.dumps(body).encode())

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class FakeKfpApiServer:
    """Start on a free 127.0.0.1 port; ``host`` is what ``kfp.Client(host=...)`` takes.

    Args:
        multi_user: answer as a multi-user (full Kubeflow) deployment.
        version: the ``tag_name`` healthz reports (the backend's release).
        user_namespaces: the profile namespaces the caller may use in multi-user mode.
        require_namespace: REQUIRE_NAMESPACE_FOR_PIPELINES (2.15+, default off).
        kfp_namespace: where KFP itself runs (writes on shared pipelines are checked there).
    """

    def __init__(
        self,
        *,
        multi_user=False,
        version="2.17.0",
        user_namespaces=("alice",),
        require_namespace=False,
        kfp_namespace="kubeflow",
    ):
        self.state = State()
        self.api = Api(
            self.state,
            multi_user=multi_user,
            version=version,
            user_namespaces=user_namespaces,
            require_namespace=require_namespace,
            kfp_namespace=kfp_namespace,
        )

    def __enter__(self):
        handler = type("BoundHandler", (Handler,), {"api": self.api})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.state.requests]
