"""Run a compiled-from-source pipeline on this machine with KFP's own local runner.

``kfp.local.SubprocessRunner`` executes every task as a subprocess of this Python, from the
same component definitions that ``make compile`` writes to YAML. Each task imports the
installed ``qlora_kfp``, exactly as it would inside the project image on a cluster.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from qlora_kfp import env
from qlora_kfp.app.demo import make_demo_assets
from qlora_kfp.app.progress import run_quietly
from qlora_kfp.tasks.context import RUN_ID_ENV

# The demo's settings, in a file people read (and the README shows): they suit the tiny demo
# model only; the parameter defaults are the ones meant for real models.
DEMO_PARAMS_FILE = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def demo_params() -> dict:
    """The settings of ``examples/demo.yaml`` (a checkout's: the demo runs from one)."""
    from qlora_kfp.app.remote_params import load

    return load(str(DEMO_PARAMS_FILE), []).from_file


def local_tracking_env(workdir: Path) -> None:
    """Point MLflow at a local SQLite store under ``workdir`` unless already configured."""
    if not env.text("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
        os.environ.setdefault(
            "QLORA_KFP_MLFLOW_ARTIFACT_ROOT", (workdir / "mlartifacts").resolve().as_uri()
        )


def run_pipeline(pipeline, params: dict, workdir: str | Path, verbose: bool = False) -> Path:
    """Run ``pipeline(**params)`` through ``kfp.local``; returns the run's output folder.

    The terminal shows one line per task (``verbose``: the runner's whole log); the whole log
    is kept as ``runner.log`` in the run folder.
    """
    from kfp import local

    workdir = Path(workdir).resolve()
    root = workdir / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    log = workdir / f"runner-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # What the pod label is on a cluster: the run id every task, cached ones too, reports under.
    saved = env.text(RUN_ID_ENV) if env.present(RUN_ID_ENV) else None
    os.environ[RUN_ID_ENV] = f"local-{uuid.uuid4().hex[:12]}"
    try:
        run_quietly(lambda: pipeline(**params), log, verbose)
    finally:
        if saved is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = saved
        new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
        run_dir = new[-1] if new else root
        if run_dir != root and log.exists():
            log = log.rename(run_dir / "runner.log")
        print(f"  full log: {log}")
    return run_dir


def collect(run_dir: Path) -> dict:
    """Artifact folders and the metrics each task wrote, keyed by task name."""
    out: dict = {}
    for meta in sorted(run_dir.rglob("executor_output.json")):
        task = meta.parent.name
        data = json.loads(meta.read_text())
        out.setdefault(task, {})["outputs"] = data
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        out.setdefault(d.name, {})["artifacts"] = {
            a.name: str(a) for a in sorted(d.iterdir()) if a.name != "executor_output.json"
        }
    return out


def demo(
    workdir: str | Path, overrides: dict | None = None, verbose: bool = False, pipeline=None
) -> dict:
    """The embedded default: build the tiny model and data, run ``pipeline`` (qlora_finetune)
    with the settings of ``examples/demo.yaml`` under ``overrides``, summarize."""
    import inspect

    from qlora_kfp import configs

    if pipeline is None:
        from qlora_kfp.pipelines.qlora_finetune import qlora_finetune as pipeline

    settings = demo_params()
    configs.check_known(
        settings, inspect.signature(pipeline.pipeline_func).parameters, str(DEMO_PARAMS_FILE)
    )
    workdir = Path(workdir).resolve()
    local_tracking_env(workdir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assets = make_demo_assets(workdir / "demo")
    params = {
        **settings,
        **assets,
        "run_name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
        **(overrides or {}),
    }
    t0 = time.perf_counter()
    run_dir = run_pipeline(pipeline, params, workdir, verbose)
    return {
        "run_dir": str(run_dir),
        "params": params,
        "seconds": round(time.perf_counter() - t0, 1),
        "tracking_uri": env.text("MLFLOW_TRACKING_URI"),
        "tasks": collect(run_dir),
    }
