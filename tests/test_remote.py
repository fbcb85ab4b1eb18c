"""Upload, versioning, runs and schedules against FakeKfpApiServer (KFP v2beta1 REST)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_kfp_api import FakeKfpApiServer

from qlora_kfp.app import remote
from qlora_kfp.errors import ConfigError

PACKAGE = str(Path(__file__).resolve().parents[1] / "pipelines/compiled/qlora_finetune.yaml")


@pytest.fixture
def api(monkeypatch):
    with FakeKfpApiServer() as server:
        monkeypatch.setenv("KFP_HOST", server.host)
        monkeypatch.setenv("KFP_TOKEN", "secret-token")
        yield server


def test_first_upload_creates_then_same_name_adds_a_version(api):
    first = remote.upload(PACKAGE)
    assert first["name"] == "qlora-finetune" and first["url"].startswith(api.host)
    second = remote.upload(PACKAGE, version="v2")
    assert second["pipeline_id"] == first["pipeline_id"]
    assert second["version_id"] != first["version_id"]
    uploads = [r for r in api.state.requests if r.path.startswith("/apis/v2beta1/pipelines/upload")]
    assert [r.path.rsplit("/", 1)[-1] for r in uploads] == ["upload", "upload_version"]
    assert uploads[1].query["name"] == ["v2"] and b"qlora-finetune" in uploads[1].body
    assert api.state.requests[-1].path  # every call went over HTTP


def test_run_uses_latest_version_experiment_and_params(api, tmp_path):
    remote.upload(PACKAGE)
    remote.upload(PACKAGE, version="v2")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("base_model: s3://models/llama\ndata_source: s3://data/train.jsonl\n")
    params = remote.load_params(str(params_file), ["lora_r=32", "run_name=nightly"])
    out = remote.run("qlora-finetune", params, "qlora")
    run = api.state.runs[-1]
    pid = next(iter(api.state.pipelines))
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pid,
        "pipeline_version_id": api.state.pipelines[pid]["versions"][-1],
    }
    assert run["runtime_config"]["parameters"]["lora_r"] == 32
    assert run["runtime_config"]["parameters"]["base_model"] == "s3://models/llama"
    assert api.state.experiments[run["experiment_id"]] == "qlora"
    assert out["url"].endswith(out["run_id"])


def test_schedule_cron_one_at_a_time_no_catchup_then_pause_resume_delete(api):
    remote.upload(PACKAGE)
    rr = remote.schedule("qlora-finetune", "0 0 3 * * 1", {"base_model": "m"}, "nightly")
    body = api.state.recurring[rr["recurring_run_id"]]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert body["max_concurrency"] == "1" or body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    listed = remote.schedules()
    assert [s["id"] for s in listed] == [rr["recurring_run_id"]]
    remote.set_schedule("pause", rr["recurring_run_id"])
    assert api.state.recurring[rr["recurring_run_id"]]["status"] == "DISABLED"
    remote.set_schedule("resume", rr["recurring_run_id"])
    assert api.state.recurring[rr["recurring_run_id"]]["status"] == "ENABLED"
    remote.set_schedule("delete", rr["recurring_run_id"])
    assert api.state.recurring == {}


def test_token_is_sent_as_bearer(api):
    remote.upload(PACKAGE)
    auth = {r.headers.get("authorization") for r in api.state.requests}
    assert auth == {"Bearer secret-token"}


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: remote.schedule("qlora-finetune", "0 3 * * 1", {}, "x"), "6 fields"),
        (lambda: remote.run("nope", {}, "x"), "no pipeline named 'nope'"),
        (lambda: remote.upload("missing.yaml"), "run make compile first"),
        (lambda: remote.load_params(None, ["lora_r"]), "use key=value"),
    ],
    ids=["five-field-cron", "unknown-pipeline", "no-package", "bad-param"],
)
def test_clear_errors(api, call, message):
    with pytest.raises(ConfigError, match=message):
        call()
