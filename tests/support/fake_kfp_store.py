"""State and shared helpers of FakeKfpApiServer: the stored resources, request parsing,
listing, and the identity and namespace rules every route applies.

Each rule cites the Go file of kubeflow/pipelines 2.17.0 it mirrors (under ``backend/src/``).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field

from support import fake_kfp_rules as rules

V2 = "/apis/v2beta1"
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


def strip(obj: dict) -> dict:
    """The API form: no private keys, no empty fields (protojson EmitUnpopulated=false)."""
    return {k: v for k, v in obj.items() if not k.startswith("_") and v not in ("", None, [])}


def sorted_page(items: list[dict], req: Request, fields: dict, model: str) -> tuple[list, str]:
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


def list_response(
    field: str, found: list[dict], req: Request, fields: dict, model: str, shown=strip
) -> dict:
    """One page of ``found`` as a List* response: ``{field: [...], total_size, next_page_token}``
    (total_size counts every match, not the page), ``shown`` giving each item's API form."""
    page, token = sorted_page(found, req, fields, model)
    return strip(
        {field: [shown(o) for o in page], "total_size": len(found), "next_page_token": token}
    )


def display_name_filter(req: Request) -> str | None:
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


# Fields a release's protos lack (backend/api/v2beta1/run.proto, recurring_run.proto):
# plugins_input is field 19 of Run and RecurringRun from 2.17.0 on.
SINCE = {"plugins_input": (2, 17), "plugins_output": (2, 17)}


def check_fields(body: dict, message: str, release: tuple[int, int] = (99, 0)) -> None:
    allowed = [f for f in FIELDS[message].split() if release >= SINCE.get(f, (0, 0))]
    camel = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), f) for f in allowed}
    unknown = [k for k in body if k not in allowed and k not in camel]
    if unknown:
        raise ApiError(400, f'proto: (line 1:2): unknown field "{unknown[0]}"')


def check_params(version: dict, runtime_config: dict | None) -> None:
    try:
        rules.check_runtime_parameters(
            rules.root_parameters(version["pipeline_spec"]), runtime_config
        )
    except rules.RuleError as exc:
        raise ApiError(400, f"Failed to create a run: Invalid input error: {exc}") from None


class Access:
    """Identity and namespace rules; the route classes build on it."""

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

    @property
    def release(self) -> tuple[int, int]:
        """``(2, 17)`` from the tag the fake reports; unknown builds speak the newest protos."""
        m = re.match(r"v?(\d+)\.(\d+)", self.tag_name or "")
        return (int(m.group(1)), int(m.group(2))) if m else (99, 0)

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
