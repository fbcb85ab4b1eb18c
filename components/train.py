"""KFP component: train (thin wrapper over qlora_kfp.train)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output
from qlora_kfp.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    quantized_model: Input[Model],
    dataset: Input[Dataset],
    adapter: Output[Model],
    metrics: Output[Metrics],
    loss_curve: Output[HTML],
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str = "all-linear",
    use_dora: bool = False,
    use_rslora: bool = False,
    learning_rate: float = 2e-4,
    lr_scheduler: str = "cosine",
    warmup_ratio: float = 0.03,
    num_epochs: float = 1.0,
    max_steps: int = 0,
    batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_layers: int = -1,
    optimizer: str = "auto",
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.3,
    eval_steps: int = 0,
    logging_steps: int = 5,
    length_grouping: bool = True,
    packing: str = "padding_free",
    pack_length: int = 0,
    fp32_upcast: bool = False,
    fused_kernels: str = "auto",
    fused_lora: bool = True,
    attn_implementation: str = "auto",
    checkpoint_steps: int = 50,
    compute_dtype: str = "auto",
    seed: int = 42,
    mlflow_parent_run_id: str = "",
    kfp_run_id: str = "",
) -> float:
    """QLoRA: train a LoRA adapter on the frozen 4-bit model; returns the eval loss."""
    from qlora_kfp import entrypoints

    return entrypoints.train(locals())
