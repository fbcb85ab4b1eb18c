"""The Kubeflow Pipelines API-server behaviours this project relies on, one test each.

Each runs against FakeKfpApiServer over plain HTTP (no kfp client in between) and cites the
Go file of kubeflow/pipelines 2.17.0 (``backend/src/...``) the behaviour comes from, so a
change of backend is checked by re-reading those files against this list.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from support.fake_kfp_api import FakeKfpApiServer
from support.remote_cli import PACKAGE

V2 = "/apis/v2beta1"
SPEC = Path(PACKAGE).read_bytes()
PARAMS = {"base_model": "m", "data_source": "d"}  # the two inputs without a default


class Raw:
    """Plain HTTP calls to a fake, as ``(status, JSON or text)``."""

    def __init__(self, server: FakeKfpApiServer, token: str | None = "alice-token"):
        self.server, self.token = server, token

    def __call__(self, method: str, path: str, body=None, **query):
        url = self.server.host + path
        query = {k: v for k, v in query.items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if isinstance(body, bytes):  # a pipeline package: multipart like kfp_server_api
            boundary = uuid.uuid4().hex
            data = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="uploadfile"; '
                    f'filename="pipeline.yaml"\r\nContent-Type: application/x-yaml\r\n\r\n'
                ).encode()
                + body
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def upload(self, name="qlora-finetune", namespace=None, spec=SPEC):
        status, out = self("POST", f"{V2}/pipelines/upload", spec, name=name, namespace=namespace)
        assert status == 200, out
        return out

    def version(self, pipeline_id, name, spec=SPEC):
        status, out = self(
            "POST", f"{V2}/pipelines/upload_version", spec, pipelineid=pipeline_id, name=name
        )
        assert status == 200, out
        return out

    def experiment(self, namespace=None, name="e"):
        status, out = self(
            "POST", f"{V2}/experiments", {"display_name": name, "namespace": namespace}
        )
        assert status == 200, out
        return out["experiment_id"]

    def recurring(self, ref, experiment_id, **fields):
        body = {
            "display_name": "nightly",
            "experiment_id": experiment_id,
            "pipeline_version_reference": ref,
            "runtime_config": {"parameters": PARAMS},
            "trigger": {"cron_schedule": {"cron": "0 0 3 * * 1"}},
            "max_concurrency": 1,
            **fields,
        }
        return self("POST", f"{V2}/recurringruns", body)


@pytest.fixture(params=["single-user", "multi-user"])
def api(request):
    with FakeKfpApiServer(multi_user=request.param == "multi-user") as server:
        yield Raw(server)


@pytest.fixture(scope="module", params=["single-user", "multi-user"])
def loaded(request):
    """One server per mode with the pipeline uploaded and an experiment made, for the table
    tests (their refusals change nothing)."""
    with FakeKfpApiServer(multi_user=request.param == "multi-user") as server:
        api = Raw(server)
        pipeline = api.upload(namespace=_ns(api))
        yield api, {"pipeline_id": pipeline["pipeline_id"]}, api.experiment(_ns(api))


@pytest.fixture
def multi():
    with FakeKfpApiServer(multi_user=True, user_namespaces=("alice",)) as server:
        yield Raw(server)


def _ns(api: Raw) -> str | None:
    return "alice" if api.server.api.multi_user else None


def _run(api: Raw, ref: dict, parameters: dict, experiment_id: str = "", **fields):
    body = {
        "display_name": "r",
        "experiment_id": experiment_id or api.experiment(_ns(api)),
        "pipeline_version_reference": ref,
        "runtime_config": {"parameters": parameters},
        **fields,
    }
    return api("POST", f"{V2}/runs", body)


# --- server identity -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.14.0", "2.17.0"])
def test_healthz_reports_release_and_multi_user_mode(version):
    # apiserver/main.go newHealthzResponse (2.17) and the literal JSON of 2.14-2.16's
    # healthz handler: commit_sha, tag_name, multi_user (the release is the image's TAG_NAME,
    # set by .github/workflows/build-and-push.yml; "unknown" on custom builds).
    with FakeKfpApiServer(multi_user=True, version=version) as server:
        status, out = Raw(server, token=None)("GET", f"{V2}/healthz")
    assert status == 200 and out["tag_name"] == version and out["multi_user"] is True
    assert "commit_sha" in out


# --- multi-user mode: identity and namespaces ------------------------------------------------


def test_multi_user_requests_need_an_identity(multi):
    # resource/resource_manager.go IsAuthorized: no bearer token (TokenReview) and no
    # kubeflow-userid header -> Unauthenticated.
    status, out = Raw(multi.server, token=None)("GET", f"{V2}/experiments", namespace="alice")
    assert status == 401 and "User identity is empty" in out["message"]


def test_multi_user_callers_act_only_in_their_own_namespaces(multi):
    # resource/resource_manager.go IsAuthorized: a SubjectAccessReview on the namespace.
    status, _ = multi("POST", f"{V2}/experiments", {"display_name": "e", "namespace": "bob"})
    assert status == 403


def test_multi_user_upload_without_a_namespace_makes_a_shared_pipeline(multi):
    # server/pipeline_upload_server.go canUploadVersionedPipeline skips authorization for an
    # empty namespace: the upload succeeds, as a pipeline every profile sees. Hence upload
    # passes the profile namespace.
    shared = multi.upload()
    assert "namespace" not in shared
    status, listed = multi("GET", f"{V2}/pipelines")  # shared ones: readable by anyone
    assert status == 200 and [p["pipeline_id"] for p in listed["pipelines"]] == [
        shared["pipeline_id"]
    ]


def test_multi_user_upload_requires_a_namespace_when_the_server_requires_one():
    # apiserver/validation/namespace.go ValidateNamespaceRequired (2.15+), switched on by
    # REQUIRE_NAMESPACE_FOR_PIPELINES (apiserver/common/config.go, default false); the
    # upload handler answers with http.Error (plain text).
    with FakeKfpApiServer(multi_user=True, require_namespace=True) as server:
        status, out = Raw(server)("POST", f"{V2}/pipelines/upload", SPEC, name="qlora-finetune")
    assert status == 400 and out.strip() == "Namespace is required for pipeline operations"


def test_multi_user_shared_pipelines_are_not_the_profiles_to_change(multi):
    # server/pipeline_server.go canAccessPipeline (2.17, kubeflow/pipelines#13288): reads of
    # a shared pipeline are open, writes are authorized in the KFP namespace (kubeflow).
    shared = multi.upload()
    assert multi("GET", f"{V2}/pipelines/{shared['pipeline_id']}/versions")[0] == 200
    status, _ = multi("DELETE", f"{V2}/pipelines/{shared['pipeline_id']}", cascade="true")
    assert status == 403
    own = multi.upload(namespace="alice")
    assert multi("DELETE", f"{V2}/pipelines/{own['pipeline_id']}", cascade="true")[0] == 200


def test_multi_user_pipeline_listing_is_per_namespace(multi):
    # server/pipeline_server.go listPipelines filters on the namespace asked for: without
    # one, only shared pipelines; so finding "our" pipeline needs the namespace too.
    own = multi.upload(namespace="alice")
    assert multi("GET", f"{V2}/pipelines")[1].get("pipelines") is None
    listed = multi("GET", f"{V2}/pipelines", namespace="alice")[1]["pipelines"]
    assert [p["pipeline_id"] for p in listed] == [own["pipeline_id"]]


def test_single_user_mode_ignores_namespaces():
    # resource/resource_manager.go ReplaceNamespace: single-user mode has none.
    with FakeKfpApiServer(multi_user=False) as server:
        api = Raw(server)
        made = api.upload(namespace="alice")
        listed = api("GET", f"{V2}/pipelines")[1]["pipelines"]
    assert "namespace" not in made and [p["pipeline_id"] for p in listed] == [made["pipeline_id"]]


def test_multi_user_experiments_need_a_namespace(multi):
    # server/experiment_server.go canAccessExperiment: an empty namespace is refused.
    assert multi("POST", f"{V2}/experiments", {"display_name": "e"})[0] == 400
    assert multi("GET", f"{V2}/experiments")[0] == 400


def test_multi_user_runs_need_an_experiment_of_the_profile(multi):
    # resource/resource_manager.go GetValidExperimentNamespacePair: no experiment id in
    # multi-user mode is refused (a v2beta1 Run has no namespace field of its own: it is
    # the experiment's).
    p = multi.upload(namespace="alice")
    body = {
        "display_name": "r",
        "pipeline_version_reference": {"pipeline_id": p["pipeline_id"]},
        "runtime_config": {"parameters": PARAMS},
    }
    status, out = multi("POST", f"{V2}/runs", body)
    assert status == 400 and "Experiment id can not be empty" in out["message"]


def test_multi_user_recurring_run_list_needs_a_namespace(multi):
    # server/job_server.go listJobs + canAccessJob: an empty namespace is refused.
    status, out = multi("GET", f"{V2}/recurringruns")
    assert status == 400 and "empty namespace" in out["message"]
    assert multi("GET", f"{V2}/recurringruns", namespace="alice")[0] == 200


# --- runs: parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters,message",
    [
        (
            {**PARAMS, "lora_rank": 8},
            "parameter(s) provided are not required by pipeline: lora_rank",
        ),
        ({**PARAMS, "run_name": 2024}, "input parameter run_name requires type string"),
        ({**PARAMS, "lora_r": "32"}, "input parameter lora_r requires type double or integer"),
        ({**PARAMS, "use_dora": "true"}, "input parameter use_dora requires type bool"),
        ({"base_model": "m"}, "parameter data_source is not optional"),
    ],
    ids=["unknown", "number-for-string", "text-for-integer", "text-for-bool", "missing-required"],
)
def test_run_parameters_are_checked_against_the_root_inputs(loaded, parameters, message):
    # template/v2_template.go validatePipelineJobInputs (runs and recurring runs).
    api, ref, experiment_id = loaded
    status, out = _run(api, ref, parameters, experiment_id)
    assert status == 400 and message in out["message"]


def test_integer_inputs_take_any_json_number(loaded):
    # template/v2_template.go validatePipelineJobInputs checks the JSON kind only: 1.5 passes
    # for a NUMBER_INTEGER input (and fails later in the task), so the client types values.
    api, ref, experiment_id = loaded
    status, _ = _run(api, ref, {**PARAMS, "lora_r": 1.5}, experiment_id)
    assert status == 200


def test_a_run_version_must_belong_to_its_pipeline(api):
    # resource/resource_manager.go fetchPipelineVersionFromPipelineSpec.
    a = api.upload(name="a", namespace=_ns(api))
    b = api.upload(name="b", namespace=_ns(api))
    versions = api("GET", f"{V2}/pipelines/{b['pipeline_id']}/versions")[1]["pipeline_versions"]
    ref = {
        "pipeline_id": a["pipeline_id"],
        "pipeline_version_id": versions[0]["pipeline_version_id"],
    }
    status, out = _run(api, ref, PARAMS)
    assert status == 400 and "belongs to pipeline" in out["message"]


def test_unknown_request_fields_are_refused(loaded):
    # apiserver/common/utils.go CustomMarshaler: DiscardUnknown=false; a v2beta1 Run has no
    # namespace field, for one.
    api, ref, experiment_id = loaded
    status, out = _run(api, ref, PARAMS, experiment_id, namespace="alice")
    assert status == 400 and 'unknown field "namespace"' in out["message"]


# --- recurring runs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron,ok",
    [
        ("0 0 3 * * 1", True),
        ("0 0 3 * * mon", True),
        ("0 */15 * * * ?", True),
        ("@daily", True),
        ("@every 6h", True),
        ("0 3 * * 1", True),  # 5 fields: second 0, minute 3, any hour, any day, January
        ("0 0 25 * * *", False),
        ("0 0 3 * * 7", False),
        ("* * * * * * *", False),
        ("0 0 3 * *", True),
        ("@fortnightly", False),
        ("0 0 3-1 * * *", False),
    ],
    ids=[
        "six-fields",
        "day-name",
        "step-and-question-mark",
        "descriptor",
        "every",
        "five-fields-read-as-seconds-first",
        "hour-25",
        "weekday-7",
        "seven-fields",
        "day-of-week-optional",
        "unknown-descriptor",
        "backwards-range",
    ],
)
def test_cron_is_robfig_cron_v1_with_seconds_first(loaded, cron, ok):
    # server/api_converter.go toModelJob -> cron.Parse of github.com/robfig/cron v1.2.0
    # (go.mod), the parser the ScheduledWorkflow controller schedules with too
    # (crd/controller/scheduledworkflow/util/cron_schedule.go); Argo's cron is not involved.
    api, ref, experiment_id = loaded
    status, out = api.recurring(ref, experiment_id, trigger={"cron_schedule": {"cron": cron}})
    assert (status == 200) is ok, out


@pytest.mark.parametrize(
    "value,ok",
    [(0, False), (1, True), (10, True), (11, False)],
    ids=["zero", "one", "ten", "eleven"],
)
def test_max_concurrency_is_between_1_and_10(loaded, value, ok):
    # server/api_converter.go toModelJob.
    api, ref, experiment_id = loaded
    status, out = api.recurring(ref, experiment_id, max_concurrency=value)
    assert (status == 200) is ok, out
    if ok:  # int64: a JSON string in protojson
        assert out["max_concurrency"] == str(value)


def test_recurring_run_without_version_id_follows_the_latest_version(api):
    # resource/resource_manager.go CreateJob leaves it unpinned; the ScheduledWorkflow
    # controller (crd/controller/scheduledworkflow/controller.go) calls CreateRun with the
    # empty version id, which takes the newest version (storage/pipeline_store.go
    # GetLatestPipelineVersion: CreatedAtInSec DESC).
    p = api.upload(namespace=_ns(api))
    status, rr = api.recurring({"pipeline_id": p["pipeline_id"]}, api.experiment(_ns(api)))
    assert status == 200 and "pipeline_version_id" not in rr["pipeline_version_reference"]
    newer = api.version(p["pipeline_id"], "v2")
    run = api.server.api.fire(rr["recurring_run_id"])
    assert run["pipeline_version_reference"]["pipeline_version_id"] == newer["pipeline_version_id"]


def test_recurring_run_with_version_id_stays_pinned(api):
    # resource/resource_manager.go CreateJob: a version id pins the recurring run.
    p = api.upload(namespace=_ns(api))
    [first] = api("GET", f"{V2}/pipelines/{p['pipeline_id']}/versions")[1]["pipeline_versions"]
    ref = {"pipeline_id": p["pipeline_id"], "pipeline_version_id": first["pipeline_version_id"]}
    _, rr = api.recurring(ref, api.experiment(_ns(api)))
    api.version(p["pipeline_id"], "v2")
    run = api.server.api.fire(rr["recurring_run_id"])
    assert run["pipeline_version_reference"]["pipeline_version_id"] == first["pipeline_version_id"]


def test_recurring_run_parameters_are_validated_on_the_latest_version(loaded):
    # resource/resource_manager.go CreateJob: ValidateJobInputs on the latest version.
    api, ref, experiment_id = loaded
    bad = {"parameters": {**PARAMS, "lora_rank": 8}}
    status, out = api.recurring(ref, experiment_id, runtime_config=bad)
    assert status == 400 and "not required by pipeline: lora_rank" in out["message"]


# --- listing --------------------------------------------------------------------------------


def test_listing_is_oldest_first_unless_sort_by_says_otherwise(api):
    # list/list.go NewOptions: every model's DefaultSortField is CreatedAtInSec, ascending.
    p = api.upload(namespace=_ns(api))
    v2 = api.version(p["pipeline_id"], "v2")
    path = f"{V2}/pipelines/{p['pipeline_id']}/versions"
    oldest_first = [v["name"] for v in api("GET", path)[1]["pipeline_versions"]]
    newest = api("GET", path, sort_by="created_at desc", page_size=1)[1]["pipeline_versions"]
    assert oldest_first == ["qlora-finetune", "v2"]
    assert [v["pipeline_version_id"] for v in newest] == [v2["pipeline_version_id"]]


@pytest.mark.parametrize(
    "sort_by,message",
    [("bogus", "Invalid sorting field"), ("created_at sideways", "invalid sort by format")],
    ids=["unknown-field", "bad-direction"],
)
def test_sort_by_is_validated(loaded, sort_by, message):
    # list/list.go NewOptions.
    api, ref, _ = loaded
    status, out = api("GET", f"{V2}/pipelines/{ref['pipeline_id']}/versions", sort_by=sort_by)
    assert status == 400 and message in out["message"]


def test_lists_page_with_a_next_page_token(api):
    # list/list.go: page_size (default 20, at most 200) and next_page_token.
    p = api.upload(namespace=_ns(api))
    api.version(p["pipeline_id"], "v2")
    path = f"{V2}/pipelines/{p['pipeline_id']}/versions"
    first = api("GET", path, page_size=1)[1]
    second = api("GET", path, page_size=1, page_token=first["next_page_token"])[1]
    assert [v["name"] for v in first["pipeline_versions"] + second["pipeline_versions"]] == [
        "qlora-finetune",
        "v2",
    ]
    assert "next_page_token" not in second and first["total_size"] == 2


# --- pipelines --------------------------------------------------------------------------------


def test_same_name_uploads_conflict_within_a_namespace(api):
    # model/pipeline.go unique index namespace_name: a second upload of a name is refused
    # (409), so a new version goes through upload_version.
    api.upload(namespace=_ns(api))
    status, _ = api(
        "POST", f"{V2}/pipelines/upload", SPEC, name="qlora-finetune", namespace=_ns(api)
    )
    assert status == 409


def test_a_version_returns_its_spec_wrapped_with_the_platform_spec(api):
    # server/api_util.go YamlStringToPipelineSpecStruct: a package with a kubernetes platform
    # spec comes back as {"pipeline_spec": ..., "platform_spec": ...}.
    p = api.upload(namespace=_ns(api))
    [v] = api("GET", f"{V2}/pipelines/{p['pipeline_id']}/versions")[1]["pipeline_versions"]
    assert set(v["pipeline_spec"]) == {"pipeline_spec", "platform_spec"}
    assert (
        "base_model"
        in v["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    )


def test_multi_user_upload_refusals_are_400_with_a_bare_message(multi):
    # server/pipeline_upload_server.go writeErrorToResponse: the upload endpoints answer an
    # authorization failure with 400 "Failed to create a pipeline" (no reason), so the
    # client cannot tell it from a bad package; upload lists pipelines (403 with a reason)
    # before it uploads.
    status, out = multi("POST", f"{V2}/pipelines/upload", SPEC, name="p", namespace="bob")
    assert (status, out["error_message"]) == (400, "Failed to create a pipeline")
    assert multi("GET", f"{V2}/pipelines", namespace="bob")[0] == 403
