"""KFP component: preflight (peak GPU memory from the model config, before any GPU task)."""

from kfp import dsl
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(
    base_model: str,
    max_seq_length: int = 512,
    batch_size: int = 4,
    lora_r: int = 16,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_layers: int = -1,
    fused_kernels: str = "auto",
    packing: str = "padding_free",
    pack_length: int = 0,
    fp32_upcast: bool = False,
    attn_implementation: str = "auto",
    gpu_memory_gib: float = 80.0,
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> str:
    """Estimate peak training memory (JSON breakdown); fail early if it cannot fit."""
    from qlora_kfp import entrypoints

    return entrypoints.preflight(locals())
