"""The whole qlora_finetune pipeline through kfp.local, as `make run` runs it, against a real
`mlflow server` (SQLite, S3 artifact root) and S3 (moto).

Three local pipeline runs in one folder: the demo as `make run` trains it (LoRA rank 16), a
shorter forced retraining with rank 4, and the demo again, which skips training. Everything is
read back from the run folders, through MlflowClient and through boto3: every stage's verified
artifact, the tuned model answering, runs and nesting, params, metric histories, artifacts in
the bucket, registered versions and the challenger/champion aliases.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from support import NESTED_STAGE_RUNS

from qlora_kfp.storage.manifest import verify

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def cli_command(args: list[str], env: dict, workdir: Path) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "QLORA_KFP_"))}
    return dict(
        args=[sys.executable, "-m", "qlora_kfp.app.cli", "run", "--workdir", str(workdir), *args],
        env={**base, **env},
        text=True,
    )


def run_cli(args: list[str], env: dict, workdir: Path) -> subprocess.CompletedProcess:
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    with subprocess.Popen(**cli_command(args, env, workdir), **kw) as proc:
        try:
            out, err = proc.communicate(timeout=900)
        except BaseException as exc:  # too slow or interrupted: stop it and its task processes
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli_watching_training(args, env, workdir, tracking_uri) -> subprocess.CompletedProcess:
    """Run the CLI and poll the tracking server while it runs: record how many loss points
    the train stage's run had while it was still RUNNING (LIVE)."""
    from mlflow.tracking import MlflowClient

    watcher = MlflowClient(tracking_uri=tracking_uri)
    with (workdir / "out.txt").open("w+") as out, (workdir / "err.txt").open("w+") as err:
        proc = subprocess.Popen(
            **cli_command(args, env, workdir), stdout=out, stderr=err, start_new_session=True
        )
        try:
            _watch(proc, watcher, deadline=time.monotonic() + 900)
        finally:  # past the deadline or interrupted: stop the CLI and its task processes
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def _watch(proc: subprocess.Popen, watcher, deadline: float) -> None:
    while proc.poll() is None and time.monotonic() < deadline:
        exp = watcher.get_experiment_by_name("compare")
        if exp is not None:
            for r in watcher.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'"):
                if r.info.status == "RUNNING":
                    points = len(watcher.get_metric_history(r.info.run_id, "loss"))
                    LIVE.append(points)
        if LIVE and max(LIVE) >= 2:  # seen: the server's CPU is the run's from here on
            with contextlib.suppress(subprocess.TimeoutExpired):  # the caller stops it
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return
        time.sleep(0.5)


SECRET = "s3cr3t-Zq81x-do-not-log"  # moto accepts any key; this one must never leak
LOGS: list[str] = []
LIVE: list[int] = []  # loss points the train run had, each time it was seen RUNNING


# The demo's registered model, <base model>-<dataset> (tests/tracking/test_registry.py checks that the
# demo's sources derive it).
MODEL = "tiny-llama-antonyms"


def champion_setting(services, key: str):
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(services.tracking_uri).get_model_version_by_alias(MODEL, "champion")
    return json.loads(mv.tags["training.made_from"])["settings"][key]


# The demo trains 20 epochs (520 steps) so that `make run` shows the tuned model answering: the
# first run is the demo as it is, and asserts that. The retraining beside it needs a loss curve,
# not a converged model: 2 epochs (52 steps, a loss point every 2) and 4 scored generations.
SHORT = ["--num_epochs", "2", "--logging_steps", "2", "--num_generations", "4"]
RUNS = {"rank-16": ["--lora_r", "16"], "rank-4": [*SHORT, "--lora_r", "4", "--force_retrain"]}


@pytest.fixture(scope="module")
def three_runs(services, tmp_path_factory):
    env = {
        **services.env(),
        "QLORA_KFP_ARTIFACT_URI": "s3://pipeline/qlora",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MLFLOW_TRACKING_PASSWORD": SECRET,
        # MLflow's own knob (overrides the 10 s the train task asks for): a short training
        # still gets system metrics sampled while it runs.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }
    out = []
    # Same data three times: the 2nd run forces retraining with another rank; the 3rd, not
    # forced, with the champion's own settings, must skip training because the champion was
    # made from exactly this dataset, base model, code and settings. One folder, as `make run`
    # run again uses: the 2nd and 3rd reuse the demo model and data the 1st made.
    workdir = tmp_path_factory.mktemp("runs")
    for name in ("rank-16", "rank-4", "unchanged-data"):
        if name == "unchanged-data":  # the settings the champion was trained with
            lora_r = str(champion_setting(services, "lora_r"))
            extra = next(
                args for args in RUNS.values() if args[args.index("--lora_r") + 1] == lora_r
            )
            extra = [a for a in extra if a != "--force_retrain"]
        else:
            extra = RUNS[name]
        args = ["--run_name", name, "--mlflow_experiment", "compare", *extra]
        if name == "rank-16":
            proc = run_cli_watching_training(args, env, workdir, services.tracking_uri)
        else:
            proc = run_cli(args, env, workdir)
        assert proc.returncode == 0, proc.stderr[-4000:]
        LOGS.extend([proc.stdout, proc.stderr])
        out.append(json.loads(proc.stdout[proc.stdout.rindex("{") :])["run_dir"])
    return out


@pytest.fixture(scope="module")
def client(services):
    from mlflow.tracking import MlflowClient

    for k, v in services.env().items():
        os.environ[k] = v
    return MlflowClient(tracking_uri=services.tracking_uri)


def parents(client):
    exp = client.get_experiment_by_name("compare")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return runs, [r for r in runs if r.data.tags.get("qlora.role") == "pipeline"]


def test_one_parent_per_pipeline_run_with_a_nested_run_per_stage(three_runs, client):
    runs, tops = parents(client)
    assert [p.info.run_name for p in tops] == ["rank-16", "rank-4", "unchanged-data"]
    for p in tops[:2]:
        assert p.info.status == "FINISHED" and p.data.tags["kfp.status"] == "SUCCEEDED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert {k.data.tags["stage"] for k in kids} == NESTED_STAGE_RUNS
        assert all(k.info.status == "FINISHED" for k in kids)
        assert p.data.tags["git.commit"] and p.data.tags["kfp.run_id"]


def test_training_metrics_are_visible_while_the_train_stage_runs(three_runs):
    """Polled mid-training: the train run was RUNNING and already had a loss history."""
    assert LIVE, "the train stage's run was never seen RUNNING"
    assert max(LIVE) >= 2, LIVE


def metrics_of(run_dir: str, task: str) -> dict:
    out = json.loads((Path(run_dir) / task / "executor_output.json").read_text())
    return out["artifacts"]["metrics"]["artifacts"][0]["metadata"]


def test_every_stage_wrote_a_verified_artifact(three_runs):
    run_dir = Path(three_runs[0])
    for task, name, kind in [
        ("prepare-dataset", "dataset", "dataset"),
        ("quantize", "quantized_model", "quantized-model"),
        ("train", "adapter", "adapter"),
        ("evaluate", "evaluation", "evaluation"),
        ("merge", "merged_model", "merged-model"),
    ]:
        verify(run_dir / task / name, kind)
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merge" / "merged_model" / "model.safetensors").is_file()
    assert "<img src='data:image/png;base64," in (run_dir / "train" / "loss_curve").read_text()


def test_the_demo_s_tuned_model_beats_the_base_and_learns_the_task(three_runs):
    run_dir, stdout = three_runs[0], LOGS[0]
    ev = metrics_of(run_dir, "evaluate")
    assert ev["tuned_eval_loss"] < 0.2 * ev["base_eval_loss"]
    assert ev["tuned_exact_match"] >= 0.5 > ev["base_exact_match"]
    assert metrics_of(run_dir, "merge")["merge_max_abs_diff"] <= 1e-3
    assert metrics_of(run_dir, "prepare-dataset")["eval_rows"] == 36
    assert "exact match" in stdout and "merge check" in stdout  # the printed summary
    assert metrics_of(run_dir, "train")["stage_seconds"] > 0  # the task's own cost, in KFP
    assert re.search(r"\ntrain +\d+\.\d\d +- +\d+\.\d\d\n", stdout)  # the printed cost table


def test_each_stage_run_records_its_cost_and_the_parent_the_demo_s_result(three_runs, client):
    runs, (parent, _, _) = parents(client)
    children = {
        r.data.tags["stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert parent.data.params["lora_r"] == "16" and parent.data.params["learning_rate"] == "0.005"
    assert parent.data.metrics["tuned_exact_match"] >= 0.5
    history = client.get_metric_history(children["train"].info.run_id, "loss")
    assert len(history) > 10 and history[-1].value < history[0].value
    arts = {a.path for a in client.list_artifacts(children["train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in arts
    # Every model stage records its wall time and peak memory; the parent, one name per stage.
    for name in ("prepare-dataset", "quantize", "train", "evaluate", "merge"):
        usage = children[name].data.metrics
        assert usage["stage_seconds"] > 0 and usage["stage_peak_rss_gib"] > 0.1, name
        assert parent.data.metrics[f"{name}.stage_seconds"] == usage["stage_seconds"], name
    train = children["train"].data.metrics
    assert train["stage_seconds"] >= train["train_runtime_s"]


def test_exit_handler_wrote_the_run_report(three_runs):
    text = (Path(three_runs[0]) / "finish-tracking" / "report").read_text()
    assert ": SUCCEEDED" in text and "| exact match |" in text
    assert "![loss curve](data:image/png;base64," in text


def test_the_last_lines_give_the_mlflow_link_the_registry_result_and_the_next_step(
    three_runs, services
):
    stdout = LOGS[0]
    human = stdout[: stdout.rindex("{")].rstrip().splitlines()  # the JSON line is for scripts
    assert human[-5] == "--- what next ---"
    assert human[-4].startswith("MLflow:    experiment compare, run rank-16")
    # The tracking server's own UI (a local store's link says to start `make mlflow-ui` first:
    # tests/app/test_mlflow_view.py).
    link = human[-3].strip()
    assert link.startswith(services.tracking_uri) and "?workflowType=machine_learning" in link
    assert human[-2] == "registry:  tiny-llama-antonyms version 1, now its champion"
    assert human[-1].startswith("next:")


def test_runs_say_who_and_what_made_them_and_open_in_the_training_view(three_runs, client):
    exp = client.get_experiment_by_name("compare")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs, tops = parents(client)
    for r in runs:
        tags = r.data.tags
        assert tags["mlflow.source.type"] == "JOB"
        assert tags["mlflow.source.name"].startswith("qlora-kfp:")
        assert tags["mlflow.user"]
    train = next(r for r in runs if r.data.tags.get("stage") == "train")
    assert train.data.tags["mlflow.source.name"] == "qlora-kfp:train"
    # system metrics sampled while training ran (the MLflow UI's system metrics tab)
    assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics), sorted(
        train.data.metrics
    )


def test_make_run_prints_one_line_per_task_and_keeps_the_full_log(three_runs):
    text = LOGS[0]  # stdout of the first run
    assert len(text.splitlines()) < 90, text[-3000:]
    assert "prepare-dataset" in text and " done in " in text and "step " in text
    assert '"executorOutput"' not in text and "Streamed logs" not in text
    log = Path(three_runs[0]) / "runner.log"
    assert log.is_file() and "Streamed logs" in log.read_text()


def test_runs_are_comparable_side_by_side(three_runs, client):
    _, (a, b, _) = parents(client)
    assert set(a.data.params) == set(b.data.params) and set(a.data.metrics) == set(b.data.metrics)
    assert (a.data.params["lora_r"], b.data.params["lora_r"]) == ("16", "4")
    for key in ("tuned_eval_loss", "base_eval_loss", "quant_rel_error", "train_loss"):
        assert key in a.data.metrics
    assert a.data.params["learning_rate"] == b.data.params["learning_rate"] == "0.005"


def test_training_curve_and_artifacts_live_in_s3(three_runs, client, services):
    runs, (a, _, _) = parents(client)
    train = next(
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == a.info.run_id
        and r.data.tags["stage"] == "train"
    )
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
        hist = client.get_metric_history(train.info.run_id, key)
        assert len(hist) > 5, key
        assert sorted(h.step for h in hist) == [h.step for h in sorted(hist, key=lambda h: h.step)]
    loss = sorted(client.get_metric_history(train.info.run_id, "loss"), key=lambda h: h.step)
    assert loss[-1].value < loss[0].value
    assert train.info.artifact_uri.startswith("s3://mlflow/")
    names = {f.path for f in client.list_artifacts(a.info.run_id, "plots")}
    assert {"plots/loss_curve.png", "plots/comparison.png"} <= names
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="pipeline", Prefix="qlora/")
        for o in page.get("Contents", [])
    ]
    kfp_id = a.data.tags["kfp.run_id"]
    for stage in ("dataset", "quantized-model", "adapter", "evaluation", "merged-model"):
        assert f"qlora/{kfp_id}/{stage}/MANIFEST.json" in keys, stage
    assert f"qlora/{kfp_id}/adapter/adapter_model.safetensors" in keys
    inputs = client.get_run(a.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == a.data.tags["dataset.digest"]


def test_registry_versions_and_aliases(three_runs, client):
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert versions[0].source.startswith("s3://pipeline/qlora/")
    assert client.get_model_version_by_alias(MODEL, "challenger").version == "2"
    loss = [float(v.tags["tuned_eval_loss"]) for v in versions]
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    assert champion == ("2" if loss[1] < loss[0] else "1")
    assert versions[1].tags["dataset_digest"] == versions[0].tags["dataset_digest"]
    first, second = (v.tags for v in versions)
    assert first["promotion.decision"] == "promoted"
    assert first["promotion.reason"] == "first version of this registered model"
    assert second["promotion.champion_before"] == "1"
    if champion == "2":  # version 1 no longer is champion, and says by whom
        assert second["promotion.decision"] == "promoted"
        assert first["promotion.replaced_by"] == "2"
    else:
        assert second["promotion.decision"] == "not promoted"
        assert "promotion.replaced_by" not in first


def test_unreachable_tracking_server_fails_fast(tmp_path):
    from support.servers import free_port

    proc = run_cli([], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}, tmp_path)
    assert proc.returncode == 2
    assert "MLflow tracking server http://127.0.0.1:" in proc.stderr
    assert "is unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "kfp").exists(), "no task may start"


def test_missing_bucket_fails_fast(services, tmp_path):
    env = {**services.env(), "QLORA_KFP_ARTIFACT_URI": "s3://no-such-bucket/qlora"}
    proc = run_cli([], env, tmp_path)
    assert proc.returncode == 2 and "the bucket does not exist" in proc.stderr
    assert not (tmp_path / "kfp").exists()


def test_no_credential_in_yaml_mlflow_or_logs(three_runs, client):
    root = Path(__file__).resolve().parents[2]
    assert SECRET not in (root / "pipelines/compiled/qlora_finetune.yaml").read_text()
    assert LOGS and not any(SECRET in log for log in LOGS)
    runs, _ = parents(client)
    for r in runs:
        assert SECRET not in json.dumps({**r.data.params, **r.data.tags})
    for run_dir in three_runs:
        for f in Path(run_dir).rglob("*.json"):
            assert SECRET not in f.read_text(errors="ignore"), f


def test_unchanged_data_skips_training_and_says_why(three_runs, client):
    runs, (_, _, skipped) = parents(client)
    assert skipped.info.status == "FINISHED"
    assert skipped.data.tags["training_decision"] == "skip"
    assert "dataset unchanged since champion" in skipped.data.tags["training_decision_reason"]
    kids = {
        r.data.tags["stage"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == skipped.info.run_id
    }
    assert kids == {"prepare-dataset", "decide-training", "preflight"}
    assert not (Path(three_runs[2]) / "train").exists()
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2


def test_mlflow_ui_compares_the_two_runs_in_a_browser(three_runs, client, services, tmp_path):
    """Headless Chromium opens the MLflow UI's run comparison and finds both runs' metrics."""
    from support.browser import page_text

    _, (a, b, _) = parents(client)
    ids = json.dumps([a.info.run_id, b.info.run_id]).replace(" ", "")
    url = (
        f"{services.tracking_uri}/#/compare-runs?runs={ids}"
        f"&experiments={json.dumps([a.info.experiment_id])}"
    )
    # Metric rows are virtualized: pick a key that sorts first (base_eval_loss); tall, as the
    # comparison tables render only the rows in the viewport.
    needles = ["rank-16", "rank-4", "base_eval_loss", "lora_r"]
    text = page_text(url, needles, tmp_path / "compare.png", (1600, 9000), timeout_ms=120_000)
    for needle in needles:
        assert needle in text, needle
