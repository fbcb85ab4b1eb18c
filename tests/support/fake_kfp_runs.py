"""Runs and recurring runs of FakeKfpApiServer, one method per route, mirroring
server/run_server.go, server/job_server.go, server/api_converter.go and
resource/resource_manager.go of kubeflow/pipelines 2.17.0."""

from __future__ import annotations

import uuid

from support import fake_kfp_rules as rules
from support.fake_kfp_pipelines import PipelinesApi
from support.fake_kfp_store import (
    ApiError,
    Request,
    check_fields,
    check_params,
    list_response,
    strip,
)


class Api(PipelinesApi):
    """The server's behaviour, one method per route, independent of HTTP."""

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
        check_fields(body, "Run", self.release)
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
        check_params(version, body.get("runtime_config"))
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
        return strip(run)

    # -- recurring runs: server/job_server.go, api_converter.go toModelJob -------------------
    def _job_access(self, req: Request, namespace: str, verb: str) -> None:
        # job_server.go canAccessJob
        if not self.multi_user:
            return
        if namespace == "":
            raise ApiError(400, "a recurring run cannot have an empty namespace in multi-user mode")
        self.authorize(req, namespace, verb, "jobs")

    def create_recurring_run(self, req: Request, body: dict) -> dict:
        check_fields(body, "RecurringRun", self.release)
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
        check_params(self._resolve_version(ref), body.get("runtime_config"))
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
        return strip(rr)

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
        # recurring_run.proto names this field recurringRuns (no snake_case proto name).
        return list_response("recurringRuns", found, req, rules.JOB_FIELDS, "Job")

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
