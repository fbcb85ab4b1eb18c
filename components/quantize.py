"""KFP component: quantize (thin wrapper over qlora_kfp.quantize)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from qlora_kfp.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def quantize(
    base_model: str,
    dataset: Input[Dataset],
    quantized_model: Output[Model],
    metrics: Output[Metrics],
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    eval_rows: int = 64,
    trust_remote_code: bool = False,
    cache_fingerprint: str = "",
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
):
    """Load the base model in 4 bit (bitsandbytes) and save it; report size and error."""
    from qlora_kfp import entrypoints

    entrypoints.quantize(locals())
