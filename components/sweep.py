"""KFP component: pick-best-trial (the sweep's winner by eval loss)."""

from kfp import dsl
from kfp.dsl import Metrics, Output
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pick_best_trial(
    lora_grid: list,
    eval_losses: list,
    metrics: Output[Metrics],
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> dict:
    """The grid entry with the lowest tuned eval loss (logged to the parent MLflow run)."""
    from qlora_kfp import entrypoints

    return entrypoints.pick_best(locals())
