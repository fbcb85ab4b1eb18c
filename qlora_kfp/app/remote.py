"""Upload, run and schedule compiled pipelines on a Kubeflow Pipelines host (v2beta1 API).

The host is ``--host`` or ``KFP_HOST`` (e.g. ``https://kubeflow.example.com/pipeline``); without
either, ``kfp.Client`` uses the current kube context. ``KFP_TOKEN`` (a bearer token, e.g. a
service-account token for multi-user Kubeflow) and ``KFP_NAMESPACE`` (the profile namespace)
are honoured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qlora_kfp.errors import ConfigError

DEFAULT_PACKAGE = "pipelines/compiled/qlora_finetune.yaml"


def client(host: str | None = None, namespace: str | None = None):
    import kfp

    return kfp.Client(
        host=host or os.environ.get("KFP_HOST") or None,
        existing_token=os.environ.get("KFP_TOKEN") or None,
        namespace=namespace or os.environ.get("KFP_NAMESPACE") or "kubeflow",
    )


def _pipeline_name(package: str) -> str:
    import yaml

    with open(package) as f:
        return next(yaml.safe_load_all(f))["pipelineInfo"]["name"]


def upload(
    package: str = DEFAULT_PACKAGE,
    name: str = "",
    version: str = "",
    description: str = "",
    kfp=None,
) -> dict:
    """Upload ``package``; when a pipeline of that name exists, add a new version instead."""
    if not Path(package).is_file():
        raise ConfigError(f"{package}: no compiled pipeline; run make compile first")
    kfp = kfp or client()
    name = name or _pipeline_name(package)
    version = version or time.strftime("v%Y%m%d-%H%M%S")
    pipeline_id = kfp.get_pipeline_id(name)
    if pipeline_id is None:
        p = kfp.upload_pipeline(package, pipeline_name=name, description=description)
        pipeline_id = p.pipeline_id
        versions = kfp.list_pipeline_versions(pipeline_id).pipeline_versions or []
        version_id = versions[0].pipeline_version_id if versions else ""
    else:
        v = kfp.upload_pipeline_version(
            package, pipeline_version_name=version, pipeline_id=pipeline_id, description=description
        )
        version_id = v.pipeline_version_id
    url = f"{kfp._uihost.rstrip('/')}/#/pipelines/details/{pipeline_id}/version/{version_id}"
    return {"pipeline_id": pipeline_id, "version_id": version_id, "name": name, "url": url}


def load_params(params_file: str | None, overrides: list[str]) -> dict:
    """Pipeline parameters from a JSON/YAML file plus ``key=value`` overrides."""
    params: dict = {}
    if params_file:
        text = Path(params_file).read_text()
        if params_file.endswith((".yaml", ".yml")):
            import yaml

            params = yaml.safe_load(text) or {}
        else:
            params = json.loads(text)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: use key=value")
        try:
            params[key] = json.loads(value)  # numbers, booleans
        except json.JSONDecodeError:
            params[key] = value
    return params


def _experiment_id(kfp, experiment: str) -> str:
    return kfp.create_experiment(experiment).experiment_id


def _pipeline_ids(kfp, name: str) -> tuple[str, str]:
    pipeline_id = kfp.get_pipeline_id(name)
    if pipeline_id is None:
        raise ConfigError(f"no pipeline named {name!r} on the host; run make upload first")
    versions = (
        kfp.list_pipeline_versions(
            pipeline_id, sort_by="created_at desc", page_size=1
        ).pipeline_versions
        or []
    )
    if not versions:
        raise ConfigError(f"pipeline {name!r} has no versions")
    return pipeline_id, versions[0].pipeline_version_id


def run(name: str, params: dict, experiment: str, run_name: str = "", kfp=None) -> dict:
    """Start one run of the latest version of pipeline ``name``."""
    kfp = kfp or client()
    pipeline_id, version_id = _pipeline_ids(kfp, name)
    r = kfp.run_pipeline(
        _experiment_id(kfp, experiment),
        run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    return {"run_id": r.run_id, "url": f"{kfp._uihost.rstrip('/')}/#/runs/details/{r.run_id}"}


def schedule(
    name: str, cron: str, params: dict, experiment: str, job_name: str = "", kfp=None
) -> dict:
    """A recurring run: cron (6 fields, seconds first), one at a time, no catch-up."""
    if len(cron.split()) != 6:
        raise ConfigError(
            f"cron {cron!r}: KFP takes 6 fields (seconds first), "
            "e.g. '0 0 3 * * 1' for Mondays at 03:00"
        )
    kfp = kfp or client()
    pipeline_id, version_id = _pipeline_ids(kfp, name)
    rr = kfp.create_recurring_run(
        _experiment_id(kfp, experiment),
        job_name or f"{name}-retrain",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    return {"recurring_run_id": rr.recurring_run_id, "cron": cron}


def schedules(kfp=None) -> list[dict]:
    kfp = kfp or client()
    out = kfp.list_recurring_runs(page_size=100).recurring_runs or []
    return [
        {
            "id": r.recurring_run_id,
            "name": r.display_name,
            "status": r.status,
            "cron": getattr(getattr(r.trigger, "cron_schedule", None), "cron", None),
        }
        for r in out
    ]


def set_schedule(action: str, recurring_run_id: str, kfp=None) -> dict:
    """``pause``, ``resume`` or ``delete`` a recurring run."""
    kfp = kfp or client()
    fn = {
        "pause": kfp.disable_recurring_run,
        "resume": kfp.enable_recurring_run,
        "delete": kfp.delete_recurring_run,
    }[action]
    fn(recurring_run_id)
    return {"recurring_run_id": recurring_run_id, "action": action}
