"""KFP component: evaluate (thin wrapper over qlora_kfp.evaluate)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output
from qlora_kfp.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    quantized_model: Input[Model],
    adapter: Input[Model],
    dataset: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    num_generations: int = 16,
    max_new_tokens: int = 64,
    eval_rows: int = 64,
    compute_dtype: str = "auto",
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> float:
    """Base vs tuned on the eval split: loss, perplexity, exact match, ROUGE-L."""
    from qlora_kfp import entrypoints

    return entrypoints.evaluate(locals())
