"""KFP component: decide-training (skip retraining when the data has not changed)."""

from kfp import dsl
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def decide_training(
    dataset_digest: str,
    registered_model_name: str = "qlora-finetune",
    force_retrain: bool = False,
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> str:
    """Returns "skip" when the champion was trained on this dataset digest, else "train"."""
    from qlora_kfp import entrypoints

    return entrypoints.decide_training(locals())
