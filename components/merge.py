"""KFP component: merge (thin wrapper over qlora_kfp.merge)."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output
from qlora_kfp.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def merge(
    base_model: str,
    adapter: Input[Model],
    merged_model: Output[Model],
    metrics: Output[Metrics],
    merge_dtype: str = "bfloat16",
    merge_tolerance: float = 1e-3,
    trust_remote_code: bool = False,
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
):
    """Merge the adapter into the 16-bit base and verify merged vs base+adapter logits."""
    from qlora_kfp import entrypoints

    entrypoints.merge(locals())
