"""The link `make run` prints opens the experiment's runs table in MLflow's model-training
view, checked in headless Chromium against a real `mlflow server`: MLflow 3.17 opens an
experiment in the GenAI view by default, whatever the experiment's tags say."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.integration


def _page_text(url: str, wait_for: list[str], shot: Path) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url, wait_until="domcontentloaded", timeout=60_000)
        try:
            page.wait_for_function(
                "needles => needles.every(n => document.body.innerText.includes(n))",
                arg=wait_for,
                timeout=60_000,
            )
        finally:
            page.screenshot(path=str(shot))
            text = page.inner_text("body")
            browser.close()
    return text


def test_the_printed_link_opens_the_runs_table(services, monkeypatch, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (make install-browser installs it)")
    import mlflow

    from qlora_kfp.app.summary import mlflow_link

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.tracking_uri)
    exp = mlflow.set_experiment("view-check")
    with mlflow.start_run(run_name="the-parent-run", experiment_id=exp.experiment_id):
        mlflow.log_metric("eval_loss", 0.5)
    link = mlflow_link(
        {"tracking_uri": services.tracking_uri, "params": {"mlflow_experiment": "view-check"}}
    )
    assert link and link.startswith(services.tracking_uri)
    text = _page_text(link, ["the-parent-run", "Model registry"], tmp_path / "runs.png")
    assert "Runs" in text and "Traces" in text
    assert "Observability" not in text  # the GenAI view's navigation
