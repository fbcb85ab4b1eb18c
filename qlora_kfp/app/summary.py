"""The end-of-run summary: where every artifact is and base vs tuned at a glance."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_kfp.tracking.report import SHOWN, STAGES, USAGE, usage_rows  # the run report's tables

TASK_OF = {"register": "register-model"}  # KFP names the task after its component
BEST_KEYS = ("trial", "trial_name", "eval_loss")  # pick-best-trial's own keys; the rest: settings


def task_metrics(tasks: dict, task: str) -> dict:
    """The metadata of a task's ``metrics`` output artifact ({} when absent)."""
    arts = tasks.get(task, {}).get("outputs", {}).get("artifacts", {})
    items = arts.get("metrics", {}).get("artifacts", [])
    return items[0].get("metadata", {}) if items else {}


LOCAL_UI = "http://127.0.0.1:5000"  # make mlflow-ui


def mlflow_link(result: dict, pipeline: str = "qlora_finetune") -> str | None:
    """The run's experiment in MLflow's runs table (model-training view); for a local store,
    on the UI ``make mlflow-ui`` serves."""
    from qlora_kfp.tracking import parent_run

    uri = result["tracking_uri"]
    default = "qlora-sweep" if pipeline == "qlora_sweep" else "qlora-finetune"  # their defaults
    experiment = result.get("params", {}).get("mlflow_experiment") or default
    local = not uri.startswith(("http://", "https://"))
    try:
        link = parent_run.experiment_link(experiment, LOCAL_UI if local else "")
    except Exception:  # noqa: BLE001 - a link is a convenience; the run has finished
        return None
    return f"{link}   (after: make mlflow-ui)" if link and local else link


def print_summary(result: dict, pipeline: str = "qlora_finetune") -> None:
    tasks = result["tasks"]
    print(f"\n=== {pipeline}: local run finished ===")
    print(f"run folder:   {result['run_dir']}")
    if result.get("tracking_uri"):
        print(f"MLflow store: {result['tracking_uri']}")
    if result.get("seconds"):
        print(f"wall time:    {result['seconds']} s")
    print("\nartifacts:")
    for task, info in sorted(tasks.items()):
        for name, path in sorted(info.get("artifacts", {}).items()):
            print(f"  {task:16s} {name:16s} {path}")
    decision = tasks.get("decide-training", {}).get("outputs", {}).get("parameterValues", {})
    if decision.get("Output") == "skip":
        print(
            "\nno model trained: training was skipped (decide-training's line above says why; "
            "--force_retrain trains anyway); the registered champion is unchanged"
        )
    best = tasks.get("pick-best-trial", {}).get("outputs", {}).get("parameterValues", {})
    if best.get("Output"):  # a sweep: its trials' stages are in MLflow, the winner here
        won = best["Output"]
        print(f"\nbest trial: {won.get('trial_name')} (eval loss {won.get('eval_loss'):.4f})")
        print("  " + json.dumps({k: v for k, v in won.items() if k not in BEST_KEYS}))
    else:
        _print_results(tasks)
    print_next(result, pipeline)


def _print_results(tasks: dict) -> None:
    ev = task_metrics(tasks, "evaluate")
    if ev:
        print(f"\n{'metric':18s} {'base':>12s} {'tuned':>12s}")
        for label, b, t in SHOWN:
            if b in ev:
                print(f"{label:18s} {ev[b]:12.4f} {ev[t]:12.4f}")
    mg = task_metrics(tasks, "merge")
    if mg:
        # merge_rounding_diff: what casting base+adapter to merge_dtype alone changes (runs
        # of before it was recorded compared with base+adapter directly).
        cast = mg.get("merge_rounding_diff")
        print(
            f"\nmerge check: max |written - peft's merge of base+adapter, cast| logit = "
            f"{mg['merge_max_abs_diff']:.3g} (tolerance {mg['merge_tolerance']})"
            + (f"; the cast to the merged dtype alone: {cast:.3g}" if cast is not None else "")
        )
    usage = usage_rows({t: task_metrics(tasks, TASK_OF.get(t, t)) for t in STAGES})
    if usage:
        print(f"\n{'stage':18s} " + " ".join(f"{c:>13s}" for c, _ in USAGE))
        for stage, cells in usage:
            print(f"{stage:18s} " + " ".join(f"{c:>13s}" for c in cells))
    samples = (
        Path(tasks.get("evaluate", {}).get("artifacts", {}).get("evaluation", "")) / "samples.jsonl"
    )
    if samples.is_file():
        print("\nsample generations (prompt -> tuned answer | reference):")
        for line in samples.read_text().splitlines()[:5]:
            s = json.loads(line)
            user = s["prompt"].split("user\n", 1)[-1].split("<|im_end|>")[0].strip()
            print(f"  {user[:50]:50s} -> {s['tuned_answer'][:20]:20s} | {s['reference']}")


def registry_line(result: dict) -> str:
    """What the run did to the Model Registry, from register-model's own metrics."""
    params = result.get("params", {})
    name = params.get("registered_model_name")
    if not name and params.get("base_model") and params.get("data_source"):
        from qlora_kfp.configs import derived_model_name

        name = derived_model_name(params["base_model"], params["data_source"])
    reg = task_metrics(result["tasks"], TASK_OF["register"])
    if not reg:
        return f"{name or 'the registered model'}: unchanged (no model was registered)"
    version = int(reg["registered_version"])
    if reg.get("promoted_to_champion"):
        return f"{name} version {version}, now its champion"
    return f"{name} version {version}, challenger (the champion stays; MLflow's tags say why)"


def print_next(result: dict, pipeline: str = "qlora_finetune") -> None:
    """The last lines: where to look (MLflow), what the registry holds now, what to do next."""
    print("\n--- what next ---")
    params = result.get("params", {})
    if result.get("tracking_uri"):
        default = "qlora-sweep" if pipeline == "qlora_sweep" else "qlora-finetune"
        experiment = params.get("mlflow_experiment") or default
        run = f", run {params['run_name']}" if params.get("run_name") else ""
        print(f"MLflow:    experiment {experiment}{run}")
        link = mlflow_link(result, pipeline)
        if link:
            print(f"           {link}")
        print(f"registry:  {registry_line(result)}")
    print(
        "next:      compare runs in MLflow (make mlflow-ui for the local store); your own model"
        ' and data: make run ARGS="--base_model ... --data_source ..." (docs/own-data.md); on a'
        " cluster: make compile, then docs/deploy.md"
    )
