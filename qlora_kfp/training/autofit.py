"""``auto`` memory settings: the fastest setting that fits, and the way back when it does not.

The train stage's memory/speed trade-offs are how many decoder layers recompute their
activations (``gradient_checkpointing_layers``) and whether the checkpointed layers keep
their inputs in host memory (``gradient_checkpointing_offload``). Every layer that does not
recompute saves a third of its matrix work; offloading costs two copies that overlap with
compute and frees room for more layers that do not recompute. So ``auto`` takes the fewest
checkpointed layers whose preflight estimate (:mod:`qlora_kfp.training.memory`) fits the
budget, offloading when that makes the count smaller.

The budget is the smaller of the GPU's free memory and ``gpu_memory_gib``, less a margin.
If the first steps still run out of memory (the estimate is a fit, not a bound), the run
starts again from its very beginning with more layers checkpointed
(:func:`train_fitting`): same initial adapter, same RNG state, no optimizer state, and the
failed attempt's history and token counts dropped (rows it already streamed to MLflow stay
in the run's history; the ``memory_settings_tried`` metric says the run started over).

One function decides (:func:`plan`, a :class:`CheckpointPlan`): the preflight calls it to
report and check what the train stage will do, the train stage to do it, with the same inputs.
One function puts a setting into the model (:func:`apply`), once for each attempt.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError

log = logging.getLogger(__name__)
MARGIN = 0.95  # share of the budget the estimate may fill (fragmentation, the fit's error)
HOST_SHARE = 0.5  # most of the host's available memory the offloaded inputs may pin
FALLBACK_STEPS = 10  # an out-of-memory error later than this is no startup misfit


@dataclass(frozen=True)
class Setting:
    """One memory setting: layers checkpointed (counted from the first) and offloading."""

    layers: int
    offload: bool
    estimate_gib: float = 0.0

    def describe(self, total: int) -> str:
        where = " with their inputs in host memory" if self.offload and self.layers else ""
        return f"{self.layers} of {total} layers checkpointed{where}"


@dataclass(frozen=True)
class CheckpointPlan:
    """The train stage's gradient checkpointing, as :func:`plan` decides it.

    ``settings``: best first; the rest are the fallbacks after running out of memory in the
    first steps (none with explicit settings or several processes). ``total_layers``: the
    model's decoder layers.
    """

    settings: tuple[Setting, ...]
    total_layers: int

    @property
    def chosen(self) -> Setting:
        """The setting training starts with (what the preflight reports and checks)."""
        return self.settings[0]


def estimate_kwargs(
    model_cfg, cfg: TrainConfig, has_varlen: bool | None = None, world_size: int | None = None
) -> dict:
    """The keyword arguments of ``memory.estimate`` that follow from the stage config.

    ``world_size``: the training processes (default: ``cfg.world_size``, ``num_processes``
    on each of ``num_nodes``, which the train stage has resolved; 0 counts as 1). The estimate
    is FSDP's with ``parallelism=fsdp``, else DDP's (``auto`` is resolved before training:
    :func:`qlora_kfp.training.parallelism.decide`)."""
    from qlora_kfp.training import attention

    return dict(
        gradient_checkpointing=cfg.gradient_checkpointing,
        fused_loss=cfg.fused_kernels != "off",
        packing=cfg.packing,
        fp32_upcast=cfg.fp32_upcast,
        attention=attention.resolve(cfg.attn_implementation, cfg.packing, has_varlen),
        dropout=dropout_mode(cfg),
        world_size=world_size or cfg.world_size,
        sharded=cfg.parallelism == "fsdp",
        recomputed=recomputed_lora_inputs(model_cfg, cfg),
    )


def recomputed_lora_inputs(model_cfg, cfg: TrainConfig) -> tuple[str, ...]:
    """Which LoRA A inputs the train stage makes again in backward
    (:mod:`qlora_kfp.training.lora_inputs`): on the fused LoRA path, not under FSDP, for
    models of Llama's layout; the norms' outputs where Liger's kernels run (``auto``
    counts as on, as for the fused loss: the train stage's GPU image has them)."""
    from qlora_kfp.training import lora_inputs

    if not cfg.fused_lora or cfg.use_dora or cfg.parallelism == "fsdp":
        return ()
    return lora_inputs.parts(model_cfg, liger_norms=cfg.fused_kernels != "off")


def dropout_mode(cfg: TrainConfig) -> str:
    """``memory.estimate``'s dropout: the fused LoRA path regenerates masks; peft's own
    forward (``fused_lora=false``, DoRA) keeps them."""
    if cfg.lora_dropout <= 0:
        return "none"
    return "peft" if not cfg.fused_lora or cfg.use_dora else "regenerated"


def offload_allowed(cfg: TrainConfig, host_free_gib: float, stash_gib: float) -> bool:
    """``on``/``off`` as set; ``auto``: when the inputs fit a share of the host's memory."""
    if cfg.gradient_checkpointing_offload != "auto":
        return cfg.gradient_checkpointing_offload == "on"
    return stash_gib <= HOST_SHARE * host_free_gib


def _estimate(model_cfg, cfg: TrainConfig, seq_len: int, layers: int, offload: bool, kw: dict):
    from qlora_kfp.training import memory

    return memory.estimate(
        model_cfg,
        seq_len,
        cfg.batch_size,
        cfg.lora_r,
        gradient_checkpointing_layers=layers,
        offload=offload,
        **kw,
    )


def setting_estimate(
    model_cfg, cfg: TrainConfig, seq_len: int, setting: Setting, *, has_varlen: bool | None
):
    """The ``memory.estimate`` :func:`plan` made of ``setting`` (same arguments), in parts."""
    return _estimate(
        model_cfg,
        cfg,
        seq_len,
        setting.layers,
        setting.offload,
        estimate_kwargs(model_cfg, cfg, has_varlen),
    )


def plan(
    model_cfg,
    cfg: TrainConfig,
    seq_len: int,
    budget_gib: float,
    host_free_gib: float,
    *,
    has_varlen: bool | None,
) -> CheckpointPlan:
    """The checkpointing to train with: the chosen setting, then ones that need less memory.

    The one place the checkpointing settings (``gradient_checkpointing``,
    ``gradient_checkpointing_layers``, ``gradient_checkpointing_offload``) are decided; the
    preflight and the train stage both call it.

    With explicit settings (a layer count, offload on/off) there is one setting and no
    fallback; with several processes (``cfg.world_size`` above 1) only the first is kept,
    as one rank starting over alone would leave the others waiting in a collective.

    Args:
        model_cfg: The model's config (``num_hidden_layers`` and the shapes).
        cfg: The train stage's config, ``num_processes`` resolved.
        seq_len: The longest row (a bin's capacity with ``packing=bins``).
        budget_gib: The GPU memory training may use (:func:`budget_gib`).
        host_free_gib: Host memory this process may pin (``inf`` when unknown).
        has_varlen: Whether the training machine has the varlen attention kernel (None: this
            machine); it decides the attention, and so the estimate.
    """
    from qlora_kfp.training import memory

    layers = model_cfg.num_hidden_layers
    kw = estimate_kwargs(model_cfg, cfg, has_varlen)
    tokens = seq_len * cfg.batch_size
    stash_gib = layers * tokens * model_cfg.hidden_size * (4 if cfg.fp32_upcast else 2) / 2**30
    can_offload = offload_allowed(cfg, host_free_gib, stash_gib)

    def setting(n: int, offload: bool) -> Setting:
        est = _estimate(model_cfg, cfg, seq_len, n, offload, kw).total_gib
        return Setting(n, offload and n > 0, est)

    def decided(*settings: Setting) -> CheckpointPlan:
        if cfg.world_size > 1:
            settings = settings[:1]
        return CheckpointPlan(settings, layers)

    if not cfg.gradient_checkpointing:
        return decided(setting(0, False))
    fixed = cfg.checkpointed_layers
    if fixed is not None:
        n = layers if fixed < 0 else min(fixed, layers)
        return decided(setting(n, can_offload and cfg.gradient_checkpointing_offload == "on"))
    budget = MARGIN * budget_gib
    options = [False, True] if can_offload else [False]
    found = {
        off: memory.fewest_checkpointed_layers(
            model_cfg, seq_len, cfg.batch_size, cfg.lora_r, budget, offload=off, **kw
        )
        for off in options
    }
    fits = [(n, off) for off, n in found.items() if n is not None]
    if fits:  # fewest layers; without offload when offloading buys no layer
        n, off = min(fits, key=lambda t: (t[0], t[1]))
    else:  # nothing fits by the estimate: try the least memory there is
        n, off = layers, can_offload
    first = setting(n, off)
    # Fallbacks: halfway to every layer, then every layer, offloading where allowed.
    steps = sorted({min(layers, n + max(1, (layers - n + 1) // 2)), layers} - {n})
    rest = [setting(k, can_offload) for k in steps if k > n]
    if n == layers and can_offload and not off:
        rest = [setting(layers, True)]
    return decided(first, *rest)


def apply(model, setting: Setting) -> None:
    """Give ``model`` the checkpointing of ``setting``: the one place a plan reaches the model.

    The model comes with checkpointing enabled in every layer (``peft_model.prepare_model``)
    or in none (``gradient_checkpointing`` off: then this changes nothing); the train stage
    applies each setting it trains with here, before its attempt starts.
    """
    from qlora_kfp.training import modeling

    modeling.checkpoint_first_layers(model, setting.layers, setting.offload)


def host_available_gib() -> float:
    """Memory the host can still give this process: ``MemAvailable``, capped by the cgroup
    limit of a container (a pod's memory limit) less what the cgroup uses."""
    avail = float("inf")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail / 2**30 if avail != float("inf") else 0.0


def budget_gib(cfg: TrainConfig) -> float:
    """The GPU's free memory or ``gpu_memory_gib``, whichever is smaller (``gpu_memory_gib``
    without a GPU)."""
    import torch

    gpu = cfg.gpu_memory_gib
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        gpu = min(gpu, free / 2**30)
    return gpu


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_fitting(
    settings: Sequence[Setting], apply, start, restart, steps_done, total_layers: int
):
    """Run ``start()`` under the first setting; on an out-of-memory error in the first
    steps, ``restart()`` (back to the initial state) and try the next setting.

    Args:
        settings: A :class:`CheckpointPlan`'s.
        apply: ``apply(setting)`` sets the model's checkpointing in place (:func:`apply`).
        start: Runs training and returns its result.
        restart: Puts the model, RNG and bookkeeping back to their initial state.
        steps_done: ``steps_done()``: optimizer steps the failed attempt completed.
        total_layers: The model's decoder layers (for messages).

    Returns:
        ``(result, setting used)``.

    Raises:
        ConfigError: out of memory with the last setting, or after the first steps.
    """
    import torch

    for i, setting in enumerate(settings):
        apply(setting)
        log.info(
            "memory setting: %s (estimated peak %.2f GiB)",
            setting.describe(total_layers),
            setting.estimate_gib,
        )
        try:
            return start(), setting
        except Exception as exc:  # noqa: BLE001 (only out-of-memory errors are handled)
            if not is_out_of_memory(exc):
                raise
            steps = steps_done()
            last = i + 1 == len(settings)
            early = steps <= FALLBACK_STEPS
            message = str(exc).splitlines()[0][:200]
        # Out of the except block: the traceback's frames (and their tensors) are gone.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if last or not early:
            hint = (
                "set gradient_checkpointing_layers=-1 and gradient_checkpointing_offload=on, "
                "or lower batch_size (raise gradient_accumulation_steps to keep the batch)"
            )
            raise ConfigError(
                f"training ran out of GPU memory at step {steps + 1} with "
                f"{setting.describe(total_layers)} ({message}); {hint}"
            ) from None
        log.warning(
            "out of GPU memory at step %d with %s: starting again from step 0 with %s",
            steps + 1,
            setting.describe(total_layers),
            settings[i + 1].describe(total_layers),
        )
        restart()
    raise AssertionError("unreachable: the last setting raises")
