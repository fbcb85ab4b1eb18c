"""The run report that always arrives: written by the exit handler, success or failure.

A Markdown artifact (rendered by the KFP UI) with the status, the failure reason, base vs tuned
metrics, the loss curve, and links to the MLflow and KFP runs; optionally posted as a
Slack-compatible JSON message to ``QLORA_KFP_WEBHOOK_URL`` (from the Secret).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.request

from qlora_kfp import env

log = logging.getLogger(__name__)
WEBHOOK_ENV = "QLORA_KFP_WEBHOOK_URL"
SHOWN = [  # (label, base metric, tuned metric): the report's and the CLI summary's table
    ("eval loss", "base_eval_loss", "tuned_eval_loss"),
    ("eval perplexity", "base_eval_perplexity", "tuned_eval_perplexity"),
    ("exact match", "base_exact_match", "tuned_exact_match"),
    ("ROUGE-L", "base_rougeL", "tuned_rougeL"),
]
STAGES = ("prepare-dataset", "quantize", "train", "evaluate", "merge", "register")
USAGE = (  # (column, metric each stage logs): the report's and the CLI summary's cost table
    ("seconds", "stage_seconds"),
    ("GPU peak GiB", "stage_gpu_peak_gib"),
    ("RSS peak GiB", "stage_peak_rss_gib"),
)


def usage_rows(metrics_of: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """One row a stage that logged its cost: the stage, then each ``USAGE`` column ("-": none).

    ``metrics_of`` maps a stage name to its metrics (unprefixed names).
    """
    rows = []
    for stage in STAGES:
        m = metrics_of.get(stage, {})
        if "stage_seconds" in m:
            rows.append((stage, [f"{m[k]:.2f}" if k in m else "-" for _, k in USAGE]))
    return rows


def usage_from_parent(metrics: dict) -> dict[str, dict]:
    """The per-stage cost the stages logged to the parent run as ``<stage>.<metric>``."""
    out: dict[str, dict] = {}
    for name, value in metrics.items():
        stage, _, key = name.partition(".")
        if stage in STAGES and key:
            out.setdefault(stage, {})[key] = value
    return out


COMPARE_PREFIX = "base_vs_tuned"  # metric group on the parent: step 0 base, step 1 tuned
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description


def log_comparison(client, run_id: str, metrics: dict) -> None:
    """Base vs tuned where MLflow itself compares them: each measure as one metric at step 0
    (base) and step 1 (tuned), so one chart per measure shows both on the same scale, and a
    table (``base_vs_tuned.json``, the run's Evaluation/Artifacts view)."""
    rows = [
        (label, metrics[b], metrics[t]) for label, b, t in SHOWN if b in metrics and t in metrics
    ]
    if not rows:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for label, base, tuned in rows:
        key = f"{COMPARE_PREFIX}/{label.replace(' ', '_')}"
        batch += [Metric(key, base, now, 0), Metric(key, tuned, now, 1)]
    client.log_batch(run_id, metrics=batch)
    table = {
        "measure": [r[0] for r in rows],
        "base": [r[1] for r in rows],
        "tuned": [r[2] for r in rows],
        "delta": [r[2] - r[1] for r in rows],
    }
    client.log_table(run_id, data=table, artifact_file=f"{COMPARE_PREFIX}.json")


def links(kfp_run_id: str, experiment_id: str = "", run_id: str = "") -> dict[str, str]:
    out = {}
    uri = env.text("MLFLOW_TRACKING_URI")
    if run_id and uri.startswith(("http://", "https://")):
        out["MLflow run"] = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    ui = env.text("KFP_UI_URL")
    if ui and kfp_run_id:
        out["KFP run"] = f"{ui.rstrip('/')}/#/runs/details/{kfp_run_id}"
    return out


def build(
    status: str,
    error: str,
    kfp_run_id: str,
    metrics: dict,
    tags: dict,
    link_map: dict[str, str],
    loss_png: bytes | None = None,
) -> str:
    """The Markdown report."""
    icon = "✅" if status == "SUCCEEDED" else "❌"
    lines = [f"# {icon} qlora-finetune run {kfp_run_id}: {status}", ""]
    if error:
        lines += ["**Failure:**", "", "```", error.strip()[:4000], "```", ""]
    if tags.get("training_decision") == "skip":
        lines += [f"Training skipped: {tags.get('training_decision_reason', '')}", ""]
    rows = [(label, metrics[b], metrics[t]) for label, b, t in SHOWN if b in metrics]
    if rows:
        lines += ["| metric | base | tuned | delta |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {lab} | {b:.4f} | {t:.4f} | {t - b:+.4f} |" for lab, b, t in rows]
        lines.append("")
    usage = usage_rows(usage_from_parent(metrics))
    if usage:
        lines += ["| stage | " + " | ".join(c for c, _ in USAGE) + " |"]
        lines += ["| --- |" + " ---: |" * len(USAGE)]
        lines += [f"| {stage} | " + " | ".join(cells) + " |" for stage, cells in usage]
        lines.append("")
    if "registered_model" in tags:
        lines += [f"Registered as `{tags['registered_model']}` ({tags.get('promotion', '')}).", ""]
    for name, url in link_map.items():
        lines.append(f"- [{name}]({url})")
    if loss_png:
        lines += ["", f"![loss curve](data:image/png;base64,{base64.b64encode(loss_png).decode()})"]
    return "\n".join(lines) + "\n"


def summary(
    status: str, kfp_run_id: str, metrics: dict, error: str, tags: dict | None = None
) -> str:
    """One Slack line; a run that trained nothing says so and names the champion it reuses."""
    text = f"qlora-finetune {kfp_run_id}: {status}"
    tags = tags or {}
    if tags.get("training_decision") == "skip":
        text += (
            f" | no model trained: reuses champion {tags.get('qlora.reused_champion_version', '')}"
        )
    if "tuned_eval_loss" in metrics:
        text += f" | eval loss {metrics['base_eval_loss']:.4f} -> {metrics['tuned_eval_loss']:.4f}"
    if error:
        text += f" | {error.strip().splitlines()[0][:300]}"
    return text


def post_webhook(url: str, text: str, timeout_s: float = 10.0) -> bool:
    """POST ``{"text": ...}``; a failing webhook is logged, never fatal for the exit handler."""
    req = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except Exception as exc:  # noqa: BLE001
        log.error("webhook post failed: %s", exc)
        return False
