"""KFP component: prepare-dataset (thin wrapper over qlora_kfp.data.prepare)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_dataset(
    data_source: str,
    base_model: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    data_format: str = "auto",
    chat_template: str = "auto",
    max_seq_length: int = 512,
    overlong: str = "drop",
    train_on_prompt: bool = False,
    dedupe: bool = True,
    eval_fraction: float = 0.1,
    min_eval_rows: int = 1,
    max_rows: int = 0,
    seed: int = 42,
    trust_remote_code: bool = False,
    cache_fingerprint: str = "",
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> str:
    """Read, validate, render, tokenize and split a dataset; returns its digest."""
    from qlora_kfp import entrypoints

    return entrypoints.prepare_dataset(locals())
