"""The KFP adapter: what a task does around a stage.

On a cluster a task's MLflow settings arrive under ``QLORA_KFP_MLFLOW_*`` names
(``pipelines/platform.py`` says why); importing this package gives them their MLflow names
before anything reads them, unless KFP's MLflow plugin injected its own set.
"""

from __future__ import annotations

import os

from qlora_kfp import env

# {MLflow's variable: the name the pipelines hand it to the container under}
PLUGIN_VARS = {
    name: f"QLORA_KFP_{name}"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
}


def adopt_mlflow_env(environ=os.environ) -> None:
    """Give the cluster's MLflow settings their MLflow names, unless the plugin set the URI.

    With KFP's MLflow plugin injecting (``injectUserEnvVars``), ``MLFLOW_TRACKING_URI`` and
    the plugin's own credentials are a set: none of ours is mixed into it.
    """
    if env.text("MLFLOW_TRACKING_URI", environ):
        return
    for name, ours in PLUGIN_VARS.items():
        if env.text(ours, environ):
            environ[name] = env.text(ours, environ)


adopt_mlflow_env()
