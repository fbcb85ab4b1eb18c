"""Upload, run and schedule compiled pipelines on a Kubeflow Pipelines backend (v2beta1 API).

Connection and environment (``KFP_HOST``, ``KFP_TOKEN``, ``KFP_NAMESPACE``,
``KFP_PROXY_NAMESPACE``, ``KFP_UI_URL``) are ``kfp_api.connect``'s. Calls go through the
generated ``kfp_server_api`` objects the client holds rather than ``kfp.Client``'s helpers,
which cannot pass a namespace everywhere, cannot leave a schedule's version open and print
links of their own. Every command prints the ids it created; links only when a UI base URL is
known, computed so that they cannot fail after the resource exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qlora_kfp.app import remote_params
from qlora_kfp.app.kfp_api import Backend, call, connect, parse_version
from qlora_kfp.errors import ConfigError

DEFAULT_PACKAGE = "pipelines/compiled/qlora_finetune.yaml"


def _pipeline_name(package: str) -> str:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 10x faster
    with open(package) as f:
        return next(yaml.load_all(f, Loader=loader))["pipelineInfo"]["name"]


def _name_filter(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": name}]}
    )


def _find_pipeline(b: Backend, name: str) -> str | None:
    """The id of pipeline ``name`` in the namespace resources go to (shared in single-user
    mode): a multi-user listing without a namespace shows only shared pipelines."""
    found = call(
        f"list pipelines named {name!r}",
        b.client._pipelines_api.pipeline_service_list_pipelines,
        filter=_name_filter(name),
        namespace=b.namespace,
        backend=b,
    )
    pipelines = found.pipelines or []
    return pipelines[0].pipeline_id if pipelines else None


def _latest_version(b: Backend, pipeline_id: str, name: str):
    versions = call(
        f"list versions of pipeline {name!r}",
        b.client._pipelines_api.pipeline_service_list_pipeline_versions,
        pipeline_id,
        sort_by="created_at desc",  # the server's default order is oldest first
        page_size=1,
        backend=b,
    ).pipeline_versions
    if not versions:
        raise ConfigError(f"pipeline {name!r} has no versions; run make upload")
    return versions[0]


def upload(
    package: str = DEFAULT_PACKAGE,
    name: str = "",
    version: str = "",
    description: str = "",
    backend: Backend | None = None,
) -> dict:
    """Upload ``package``; when a pipeline of that name exists, add a new version instead.

    In multi-user mode the pipeline belongs to the profile namespace: a shared one would be
    visible to every profile and, on 2.17, not the profile's to add versions to or delete.
    """
    if not Path(package).is_file():
        raise ConfigError(f"{package}: no compiled pipeline; run make compile first")
    b = backend or connect()
    name = name or _pipeline_name(package)
    version = version or time.strftime("v%Y%m%d-%H%M%S")
    upload_api = b.client._upload_api
    pipeline_id = _find_pipeline(b, name)
    if pipeline_id is None:
        p = call(
            f"upload pipeline {name!r}",
            upload_api.upload_pipeline,
            package,
            name=name,
            description=description or None,
            namespace=b.namespace,
            backend=b,
        )
        pipeline_id = p.pipeline_id
        version_id = _latest_version(b, pipeline_id, name).pipeline_version_id
    else:
        v = call(
            f"upload version {version!r} of pipeline {name!r}",
            upload_api.upload_pipeline_version,
            package,
            name=version,
            pipelineid=pipeline_id,
            description=description or None,
            backend=b,
        )
        version_id = v.pipeline_version_id
    out = {"pipeline_id": pipeline_id, "version_id": version_id, "name": name}
    return _with_link(
        out, b, f"#/pipelines/details/{pipeline_id}/version/{version_id}", b.namespace
    )


def _with_link(out: dict, b: Backend, fragment: str, namespace: str | None) -> dict:
    if namespace:
        out["namespace"] = namespace
    url = b.link(fragment)
    if url:
        out["url"] = url
    return out


def load_params(params_file: str | None, overrides: list[str]) -> remote_params.Params:
    """Pipeline parameters from a JSON/YAML file plus ``key=value`` overrides (typed later,
    by the uploaded pipeline's declared inputs)."""
    return remote_params.load(params_file, overrides)


def _experiment_id(b: Backend, experiment: str) -> str:
    import kfp_server_api as api

    found = call(
        f"list experiments named {experiment!r}",
        b.client._experiment_api.experiment_service_list_experiments,
        filter=_name_filter(experiment),
        namespace=b.namespace,
        backend=b,
    ).experiments
    if found:
        return found[0].experiment_id
    return call(
        f"create experiment {experiment!r}",
        b.client._experiment_api.experiment_service_create_experiment,
        api.V2beta1Experiment(display_name=experiment, namespace=b.namespace),
        backend=b,
    ).experiment_id


def _target(b: Backend, name: str, params: remote_params.Params):
    """Pipeline id, its latest version and the parameters typed by that version's inputs."""
    pipeline_id = _find_pipeline(b, name)
    if pipeline_id is None:
        where = f" in namespace {b.namespace!r}" if b.namespace else ""
        raise ConfigError(f"no pipeline named {name!r} on {b.host}{where}; run make upload first")
    version = _latest_version(b, pipeline_id, name)
    typed = params.typed(remote_params.root_inputs(version.pipeline_spec or {}))
    return pipeline_id, version, typed


def _plugins_input(b: Backend, version, typed: dict) -> dict | None:
    """Where KFP's own MLflow plugin should track the run: the run's ``mlflow_experiment``.

    A 2.17 backend with the plugin on opens the parent MLflow run itself, in the experiment
    named by ``plugins_input.mlflow.experiment_name`` ("Default" without it;
    backend/src/apiserver/plugins/mlflow/config.go ``MLflowPluginInput``); without the plugin
    the field is kept and unused. Older releases have no such field and refuse it.
    """
    if (parse_version(b.version) or (0, 0)) < (2, 17):
        return None
    inputs = remote_params.root_inputs(version.pipeline_spec or {})
    default = (inputs.get("mlflow_experiment") or {}).get("defaultValue")
    experiment = typed.get("mlflow_experiment", default)
    return {"mlflow": {"experiment_name": experiment}} if experiment else None


def run(
    name: str,
    params: remote_params.Params,
    experiment: str,
    run_name: str = "",
    service_account: str = "",
    backend: Backend | None = None,
) -> dict:
    """Start one run of the latest version of pipeline ``name`` (pinned to that version)."""
    import kfp_server_api as api

    b = backend or connect()
    pipeline_id, version, typed = _target(b, name, params)
    body = api.V2beta1Run(
        display_name=run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment_id=_experiment_id(b, experiment),
        pipeline_version_reference=api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version.pipeline_version_id
        ),
        runtime_config=api.V2beta1RuntimeConfig(parameters=typed),
        service_account=service_account or None,  # empty: the backend's default
        plugins_input=_plugins_input(b, version, typed),
    )
    r = call(f"start a run of {name!r}", b.client._run_api.run_service_create_run, body, backend=b)
    out = {"run_id": r.run_id, "pipeline_version_id": version.pipeline_version_id}
    return _with_link(out, b, f"#/runs/details/{r.run_id}", b.namespace)


def schedule(
    name: str,
    cron: str,
    params: remote_params.Params,
    experiment: str,
    job_name: str = "",
    service_account: str = "",
    backend: Backend | None = None,
) -> dict:
    """A recurring run of pipeline ``name``: cron (6 fields, seconds first), one run at a
    time, no catch-up, and no pinned version, so each run takes the latest version uploaded
    by then (the backend resolves an omitted version id when the run starts)."""
    import kfp_server_api as api

    # robfig/cron, the backend's parser, also takes 5 fields but reads them as seconds to
    # months: a crontab line would silently mean something else.
    if not cron.startswith("@") and len(cron.split()) != 6:
        raise ConfigError(
            f"cron {cron!r}: KFP takes 6 fields (seconds first), "
            "e.g. '0 0 3 * * 1' for Mondays at 03:00"
        )
    b = backend or connect()
    pipeline_id, version, typed = _target(b, name, params)  # validated on the latest version
    body = api.V2beta1RecurringRun(
        display_name=job_name or f"{name}-retrain",
        experiment_id=_experiment_id(b, experiment),
        namespace=b.namespace,
        pipeline_version_reference=api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=api.V2beta1RuntimeConfig(parameters=typed),
        trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron)),
        max_concurrency="1",
        no_catchup=True,
        mode=api.RecurringRunMode.ENABLE,
        service_account=service_account or None,
        plugins_input=_plugins_input(b, version, typed),
    )
    rr = call(
        f"schedule {name!r}",
        b.client._recurring_run_api.recurring_run_service_create_recurring_run,
        body,
        backend=b,
    )
    out = {"recurring_run_id": rr.recurring_run_id, "cron": cron, "pipeline_version": "latest"}
    return _with_link(out, b, f"#/recurringrun/details/{rr.recurring_run_id}", b.namespace)


def schedules(backend: Backend | None = None) -> list[dict]:
    """Every recurring run in the namespace resources go to, newest first."""
    b = backend or connect()
    out, token = [], ""
    while True:
        page = call(
            "list recurring runs",
            b.client._recurring_run_api.recurring_run_service_list_recurring_runs,
            namespace=b.namespace,  # required in multi-user mode
            sort_by="created_at desc",
            page_size=100,
            page_token=token or None,
            backend=b,
        )
        for r in page.recurring_runs or []:
            ref = r.pipeline_version_reference
            out.append(
                {
                    "id": r.recurring_run_id,
                    "name": r.display_name,
                    "status": r.status,
                    "cron": getattr(getattr(r.trigger, "cron_schedule", None), "cron", None),
                    "pipeline_version": (ref.pipeline_version_id if ref else None) or "latest",
                }
            )
        token = page.next_page_token
        if not token:
            return out


def set_schedule(action: str, recurring_run_id: str, backend: Backend | None = None) -> dict:
    """``pause``, ``resume`` or ``delete`` a recurring run."""
    b = backend or connect()
    rr_api = b.client._recurring_run_api
    fn = {
        "pause": rr_api.recurring_run_service_disable_recurring_run,
        "resume": rr_api.recurring_run_service_enable_recurring_run,
        "delete": rr_api.recurring_run_service_delete_recurring_run,
    }[action]
    call(f"{action} recurring run {recurring_run_id}", fn, recurring_run_id, backend=b)
    return {"recurring_run_id": recurring_run_id, "action": action}
