"""The exit handler's report and webhook (a loopback HTTP server stands in for Slack)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from qlora_kfp.tasks.bookkeeping_tasks import finish_tracking
from qlora_kfp.tracking import parent_run, report


@pytest.fixture
def webhook():
    """A loopback HTTP endpoint that records the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    # Polled every 10 ms: shutdown() waits for the poll (0.5 s by default, 80 times a run).
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    ).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


@pytest.mark.parametrize(
    "state,error",
    [("SUCCEEDED", ""), ("FAILED", "train failed: loss is nan at step 7")],
    ids=["success", "failure"],
)
def test_exit_handler_reports_and_posts(state, error, local_mlflow, webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv(report.WEBHOOK_ENV, url)
    monkeypatch.setenv("KFP_UI_URL", "https://kfp.example.com")
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-42"})
    parent_run.client().log_metric(parent, "base_eval_loss", 6.5)
    parent_run.client().log_metric(parent, "tuned_eval_loss", 0.5)
    # What the train and quantize stages log to the parent about their own cost.
    for name, value in [
        ("train.stage_seconds", 57.78),
        ("train.stage_gpu_peak_gib", 0.705),
        ("train.stage_peak_rss_gib", 1.77),
        ("quantize.stage_seconds", 30.87),
        ("quantize.stage_peak_rss_gib", 2.96),
    ]:
        parent_run.client().log_metric(parent, name, value)
    out = local_mlflow / "report.md"
    finish_tracking(
        {
            "mlflow_experiment": "exp",
            "kfp_run_id": "run-42",
            "status": SimpleNamespace(state=state, error_message=error),
            "report": SimpleNamespace(path=str(out)),
        }
    )
    text = out.read_text()
    assert f"run-42: {state}" in text and "| eval loss | 6.5000 | 0.5000 | -6.0000 |" in text
    assert "https://kfp.example.com/#/runs/details/run-42" in text
    # The cost table: pipeline order, "-" where a stage used no GPU.
    assert "| quantize | 30.87 | - | 2.96 |\n| train | 57.78 | 0.70 | 1.77 |" in text
    assert (error in text) if error else "Failure" not in text
    line = f"qlora-finetune run-42: {state} | eval loss 6.5000 -> 0.5000"
    assert received == [{"text": f"{line} | {error}" if error else line}]
    run = parent_run.client().get_run(parent)
    assert run.info.status == ("FINISHED" if state == "SUCCEEDED" else "FAILED")
    # MLflow itself shows base vs tuned: one metric, two steps, and a table; and the report is
    # the run's description.
    history = parent_run.client().get_metric_history(parent, "base_vs_tuned/eval_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 6.5), (1, 0.5)]
    assert "base_vs_tuned.json" in {a.path for a in parent_run.client().list_artifacts(parent)}
    assert "| eval loss | 6.5000 | 0.5000 | -6.0000 |" in run.data.tags["mlflow.note.content"]


def test_unreachable_webhook_is_logged_not_fatal():
    from support.servers import free_port

    assert report.post_webhook(f"http://127.0.0.1:{free_port()}/x", "hi", timeout_s=2) is False


def test_report_without_tracking(tmp_path):
    out = tmp_path / "r.md"
    finish_tracking(
        {
            "mlflow_experiment": "e",
            "kfp_run_id": "k",
            "report": SimpleNamespace(path=str(out)),
            "status": SimpleNamespace(state="FAILED", error_message="quantize failed: OOM"),
        }
    )
    assert "quantize failed: OOM" in out.read_text()
