"""``qlora-kfp upload | run-remote | schedule`` against FakeKfpApiServer (the KFP 2.17 API
server's v2beta1 rules), in single-user (standalone KFP) and multi-user (full Kubeflow) mode.

Every test goes through ``cli.main``, the entry point ``make upload``, ``make run-remote`` and
``make schedule`` call, and asserts on what the server holds afterwards.
"""

from __future__ import annotations

import pytest
from support import remote_cli
from support.fake_kfp_api import FakeKfpApiServer
from support.remote_cli import PACKAGE, REQUIRED

MODES = ["single-user", "multi-user"]


@pytest.fixture(params=MODES)
def kfp_api(request, monkeypatch, tmp_path):
    """The fake in each mode, reached through KFP_HOST with a token (and, multi-user, the
    profile namespace alice)."""
    remote_cli.isolate(monkeypatch, tmp_path)
    with FakeKfpApiServer(multi_user=request.param == "multi-user") as server:
        monkeypatch.setenv("KFP_HOST", server.host)
        monkeypatch.setenv("KFP_TOKEN", "secret-token")
        if server.api.multi_user:
            monkeypatch.setenv("KFP_NAMESPACE", "alice")
        yield server


@pytest.fixture
def qlora(capsys):
    """Run ``qlora-kfp ARGS``: ``(exit code, the JSON it printed, stderr)``."""
    return lambda *args: remote_cli.run(capsys, *args)


def _ns(server) -> str:
    return "alice" if server.api.multi_user else ""


def _upload(qlora, *extra):
    code, out, err = qlora("upload", "--package", PACKAGE, *extra)
    assert code == 0, err
    return out


def test_upload_creates_the_pipeline_in_the_callers_namespace_then_adds_versions(kfp_api, qlora):
    first = _upload(qlora)
    second = _upload(qlora, "--version", "v2")
    [pipeline] = kfp_api.state.pipelines.values()
    assert pipeline["namespace"] == _ns(kfp_api)  # never a shared pipeline in multi-user mode
    assert second["pipeline_id"] == first["pipeline_id"] == pipeline["pipeline_id"]
    assert [v["pipeline_version_id"] for v in pipeline["versions"]] == [
        first["version_id"],
        second["version_id"],
    ]
    assert pipeline["versions"][1]["name"] == "v2"
    assert first["url"] == (
        f"{kfp_api.host}/#/pipelines/details/{first['pipeline_id']}/version/{first['version_id']}"
    )


def test_run_types_each_param_by_the_pipelines_declared_input(kfp_api, qlora, tmp_path):
    _upload(qlora)
    _upload(qlora, "--version", "v2")
    params = tmp_path / "params.yaml"
    params.write_text(
        "base_model: s3://models/llama\ndata_source: s3://d/x.jsonl\nlora_r: 8\n"
        "gpu_tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n"
    )
    code, out, err = qlora(
        "run-remote",
        "--params_file",
        params,
        "--param",
        "run_name=2024",
        "--param",
        "lora_r=32",
        "--param",
        "learning_rate=1e-4",
        "--param",
        "use_dora=true",
        "--param",
        'gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"}',
        "--experiment",
        "nightly",
    )
    assert code == 0, err
    [run] = kfp_api.state.runs
    assert run["runtime_config"]["parameters"] == {
        "base_model": "s3://models/llama",
        "data_source": "s3://d/x.jsonl",
        "lora_r": 32,  # the flag wins over the file
        "run_name": "2024",  # a STRING input stays text
        "learning_rate": 0.0001,
        "use_dora": True,
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},  # STRUCT: JSON
        "gpu_tolerations": [  # LIST, from YAML
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
    }
    latest = next(iter(kfp_api.state.pipelines.values()))["versions"][-1]
    assert run["pipeline_version_reference"]["pipeline_version_id"] == latest["pipeline_version_id"]
    assert kfp_api.state.experiments[run["experiment_id"]]["display_name"] == "nightly"
    assert kfp_api.state.experiments[run["experiment_id"]]["namespace"] == _ns(kfp_api)
    assert out["run_id"] == run["run_id"] and out["url"].endswith(run["run_id"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--param", "lora_rank=8"], "unknown parameter 'lora_rank'; did you mean lora_r?"),
        (["--param", "lora_r=8.5"], "--param lora_r=8.5: lora_r takes an integer"),
        (["--param", "use_dora=yes"], "use_dora takes true or false"),
        (["--param", "learning_rate=nan"], "learning_rate takes a number"),
        (["--param", "gpu_node_selector=[1]"], "gpu_node_selector takes a JSON object"),
    ],
    ids=["unknown-name", "fraction-for-integer", "yes-for-boolean", "nan", "list-for-struct"],
)
def test_run_refuses_params_the_pipeline_does_not_declare_or_type(kfp_api, qlora, args, message):
    _upload(qlora)
    code, _, err = qlora("run-remote", *REQUIRED, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert kfp_api.state.runs == []


@pytest.mark.parametrize(
    "text,message",
    [
        ("run_name: 2024\n", "parameter 'run_name' takes text, got int 2024 (quote it)"),
        ("lora_r: 1.5\n", "parameter 'lora_r' takes an integer, got float"),
        ("use_dora: 'yes'\n", "parameter 'use_dora' takes true or false, got str"),
        ("lora_rank: 8\n", "unknown parameter 'lora_rank'; did you mean lora_r?"),
        ("- lora_r\n", "expected a mapping of parameter names to values"),
        ("lora_r: [1\n", "line 2: not valid YAML"),
    ],
    ids=[
        "unquoted-year",
        "fraction-for-integer",
        "text-for-boolean",
        "unknown-name",
        "not-a-mapping",
        "broken-yaml",
    ],
)
def test_params_file_values_must_fit_their_declared_type(kfp_api, qlora, tmp_path, text, message):
    _upload(qlora)
    params = tmp_path / "params.yaml"
    params.write_text(text)
    code, _, err = qlora("run-remote", "--params_file", params, *REQUIRED)
    assert code == 2 and f"{params}" in err and message in err
    assert kfp_api.state.runs == []


def test_run_without_a_required_param_fails_before_creating_anything(kfp_api, qlora):
    _upload(qlora)
    code, _, err = qlora("run-remote", "--param", "base_model=m")
    assert code == 2 and "missing pipeline parameter(s) data_source" in err
    assert kfp_api.state.runs == [] and kfp_api.state.experiments == {}


def test_schedule_follows_the_latest_uploaded_version(kfp_api, qlora):
    _upload(qlora)
    code, out, err = qlora("schedule", "create", "--cron", "0 0 3 * * 1", *REQUIRED)
    assert code == 0, err
    rr = kfp_api.state.recurring[out["recurring_run_id"]]
    assert "pipeline_version_id" not in rr["pipeline_version_reference"]
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert rr["max_concurrency"] == "1" and rr["no_catchup"] is True
    assert rr["namespace"] == _ns(kfp_api)
    newer = _upload(qlora, "--version", "v2")  # uploaded after the schedule was made
    run = kfp_api.api.fire(out["recurring_run_id"])
    assert run["pipeline_version_reference"]["pipeline_version_id"] == newer["version_id"]


def test_schedule_list_pause_resume_delete(kfp_api, qlora):
    _upload(qlora)
    _, made, _ = qlora("schedule", "create", "--cron", "@daily", *REQUIRED)
    rid = made["recurring_run_id"]
    code, listed, err = qlora("schedule", "list")
    assert code == 0, err
    assert listed == [
        {
            "id": rid,
            "name": "qlora-finetune-retrain",
            "status": "ENABLED",
            "cron": "@daily",
            "pipeline_version": "latest",
        }
    ]
    for action, status in [("pause", "DISABLED"), ("resume", "ENABLED")]:
        assert qlora("schedule", action, "--id", rid)[0] == 0
        assert kfp_api.state.recurring[rid]["status"] == status
    assert qlora("schedule", "delete", "--id", rid)[0] == 0
    assert kfp_api.state.recurring == {}


def test_service_account_goes_to_runs_and_schedules(kfp_api, qlora, monkeypatch):
    _upload(qlora)
    assert qlora("run-remote", *REQUIRED, "--service_account", "trainer")[0] == 0
    assert kfp_api.state.runs[-1]["service_account"] == "trainer"
    monkeypatch.setenv("KFP_SERVICE_ACCOUNT", "scheduler")  # read when the parser is built
    assert qlora("schedule", "create", *REQUIRED)[0] == 0
    assert next(iter(kfp_api.state.recurring.values()))["service_account"] == "scheduler"
    monkeypatch.delenv("KFP_SERVICE_ACCOUNT")
    assert qlora("run-remote", *REQUIRED)[0] == 0
    assert "service_account" not in kfp_api.state.runs[-1]  # the backend's default


@pytest.mark.parametrize(
    "cron", ["0 3 * * 1", "* * * * * * *"], ids=["five-field-crontab", "seven-fields"]
)
def test_schedule_refuses_cron_without_six_fields(kfp_api, qlora, cron):
    _upload(qlora)
    code, _, err = qlora("schedule", "create", "--cron", cron, *REQUIRED)
    assert code == 2 and "KFP takes 6 fields (seconds first)" in err
    assert kfp_api.state.recurring == {}


@pytest.mark.parametrize(
    "args,message",
    [
        (["run-remote", "--name", "nope"], "no pipeline named 'nope'"),
        (["upload", "--package", "missing.yaml"], "run make compile first"),
        (["run-remote", "--param", "lora_r"], "use key=value"),
        (["run-remote", "--params_file", "nope.yaml"], "nope.yaml: no such params file"),
        (["schedule", "pause"], "schedule pause needs --id"),
    ],
    ids=["unknown-pipeline", "no-package", "bad-param", "no-params-file", "pause-without-id"],
)
def test_clear_errors(kfp_api, qlora, args, message):
    code, _, err = qlora(*args)
    assert code == 2 and message in err and "Traceback" not in err


def test_token_is_sent_as_bearer(kfp_api, qlora):
    _upload(qlora)
    assert {r.headers.get("authorization") for r in kfp_api.state.requests} == {
        "Bearer secret-token"
    }


@pytest.mark.parametrize(
    "release,expected",
    [("2.17.0", {"mlflow": {"experiment_name": "team-llm"}}), ("2.16.1", None)],
    ids=["2.17-names-the-plugin-experiment", "2.16-has-no-plugins-field"],
)
def test_runs_tell_kfps_mlflow_plugin_their_experiment(
    monkeypatch, tmp_path, qlora, release, expected
):
    """A 2.17 backend with its MLflow plugin on tracks the run in plugins_input's experiment
    ("Default" otherwise); 2.16 has no such field in its Run proto and refuses it."""
    remote_cli.isolate(monkeypatch, tmp_path)
    with FakeKfpApiServer(version=release) as server:
        monkeypatch.setenv("KFP_HOST", server.host)
        _upload(qlora)
        args = (*REQUIRED, "--param", "mlflow_experiment=team-llm")
        assert qlora("run-remote", *args)[0] == 0
        assert server.state.runs[-1].get("plugins_input") == expected
        assert qlora("schedule", "create", *args)[0] == 0
        assert next(iter(server.state.recurring.values())).get("plugins_input") == expected
