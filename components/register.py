"""KFP component: register-model (thin wrapper over qlora_kfp.registry)."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(
    merged_model: Input[Model],
    base_model: str,
    dataset_digest: str,
    tuned_eval_loss: float,
    metrics: Output[Metrics],
    registered_model_name: str = "qlora-finetune",
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> str:
    """New MLflow model version, alias challenger; champion when it beats the champion."""
    from qlora_kfp import entrypoints

    return entrypoints.register(locals())
