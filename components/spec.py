"""What each component is: its artifacts, its extra inputs, its image and the task it calls.

The component modules beside this file are generated from this table and from the stage
configs (``qlora_kfp/configs.py``) by ``make generate``: a config field becomes a typed
parameter with the field's default, and its help text becomes the parameter's description in
the KFP UI. ``tests/components/test_generated.py`` fails when a generated file is stale.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT = ("mlflow_parent_run_id", "kfp_run_id")  # where the task reports (tasks.context)
# The backend's cache key holds every input value (tests/support/kfp_backend.py), so a cached component
# takes only inputs that describe its work and finds its run from its pod (tasks.context).
CACHED = ("prepare_dataset", "quantize")


@dataclass(frozen=True)
class ComponentSpec:
    """One component.

    Attributes:
        name: The Python function name (KFP names the task after it, with dashes).
        doc: The component's one-line description.
        call: ``module.function`` under ``qlora_kfp.tasks`` that the body calls with its locals.
        gpu: Runs on the GPU image.
        configs: Names from ``configs.STAGE_CONFIGS`` (or ``pipeline``) whose fields become
            parameters, in order, each name once.
        inputs: ``(name, annotation)`` of inputs that come before the config fields:
            artifacts and upstream outputs.
        extra: ``(name, annotation, default source)`` inputs after the config fields.
        returns: The return annotation ("" for none).
        context: Takes the :data:`CONTEXT` parameters (never a :data:`CACHED` component).
        exclude: Config fields that are not parameters of this component.
    """

    name: str
    doc: str
    call: str
    gpu: bool = False
    configs: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, str, str], ...] = ()
    returns: str = ""
    context: bool = True
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.context and self.name in CACHED:
            raise ValueError(f"{self.name} is cached: it must not take the per-run {CONTEXT}")


ALL_STAGES = ("prepare", "quantize", "train", "evaluate", "merge", "register")

COMPONENTS: tuple[ComponentSpec, ...] = (
    ComponentSpec(
        "start_tracking",
        "Check MLflow and S3 before any GPU is claimed, then create the parent MLflow run.",
        "bookkeeping_tasks.start_tracking",
        inputs=(
            ("mlflow_experiment", "str"),
            ("run_name", "str"),
            ("kfp_run_id", "str"),
            ("base_model", "str"),
            ("data_source", "str"),
            ("pipeline_name", "str"),
        ),
        returns="str",
        context=False,
    ),
    ComponentSpec(
        "finish_tracking",
        "Exit handler: close the parent run, write the run report, post the webhook, clean up.",
        "bookkeeping_tasks.finish_tracking",
        inputs=(
            ("mlflow_experiment", "str"),
            ("kfp_run_id", "str"),
            ("status", "PipelineTaskFinalStatus"),
            ("report", "Output[Markdown]"),
        ),
        context=False,
    ),
    ComponentSpec(
        "fingerprint_sources",
        "Digest of the data, the base model and the running code; never cached.",
        "bookkeeping_tasks.fingerprint_sources",
        inputs=(("data_source", "str"), ("base_model", "str")),
        returns="str",
        context=False,
    ),
    ComponentSpec(
        "preflight",
        "Validate every stage's settings and estimate peak GPU memory (JSON breakdown); fail "
        "before any GPU task when training cannot fit.",
        "bookkeeping_tasks.preflight",
        configs=(*ALL_STAGES, "pipeline"),
        extra=(("lora_grid", "list", "[]"),),
        returns="str",
    ),
    ComponentSpec(
        "prepare_dataset",
        "Read, validate, render, tokenize and split a dataset; returns its digest.",
        "stage_tasks.prepare_dataset",
        configs=("prepare",),
        inputs=(("dataset", "Output[Dataset]"), ("metrics", "Output[Metrics]")),
        extra=(("cache_fingerprint", "str", '""'),),
        returns="str",
        context=False,
    ),
    ComponentSpec(
        "decide_training",
        'Returns "skip" when the champion was made from this dataset, base model, code and '
        'result-changing settings, else "train".',
        "bookkeeping_tasks.decide_training",
        configs=(*ALL_STAGES, "pipeline"),
        inputs=(("dataset_digest", "str"), ("cache_fingerprint", "str")),
        exclude=(
            "mlflow_experiment",
            "run_name",
            "gpu_accelerator",
            "gpu_node_selector",
            "gpu_tolerations",
        ),
        returns="str",
    ),
    ComponentSpec(
        "quantize",
        "Load the base model in 4 bit (bitsandbytes) and save it; report size and error.",
        "stage_tasks.quantize",
        gpu=True,
        configs=("quantize",),
        inputs=(
            ("dataset", "Input[Dataset]"),
            ("quantized_model", "Output[Model]"),
            ("metrics", "Output[Metrics]"),
        ),
        extra=(("cache_fingerprint", "str", '""'),),
        context=False,
    ),
    ComponentSpec(
        "train",
        "QLoRA: train a LoRA adapter on the frozen 4-bit model; returns the eval loss.",
        "stage_tasks.train",
        gpu=True,
        configs=("train",),
        inputs=(
            ("quantized_model", "Input[Model]"),
            ("dataset", "Input[Dataset]"),
            ("adapter", "Output[Model]"),
            ("metrics", "Output[Metrics]"),
            ("loss_curve", "Output[HTML]"),
        ),
        extra=(("config_overrides", "dict", "{}"),),
        returns="float",
    ),
    ComponentSpec(
        "evaluate",
        "Base vs tuned on the eval split: loss, perplexity, exact match, ROUGE-L.",
        "stage_tasks.evaluate",
        gpu=True,
        configs=("evaluate",),
        inputs=(
            ("quantized_model", "Input[Model]"),
            ("adapter", "Input[Model]"),
            ("dataset", "Input[Dataset]"),
            ("evaluation", "Output[Artifact]"),
            ("metrics", "Output[Metrics]"),
            ("report", "Output[HTML]"),
        ),
        extra=(("config_overrides", "dict", "{}"),),
        returns="float",
    ),
    ComponentSpec(
        "merge",
        "Merge the adapter into the 16-bit base and verify merged vs base+adapter logits; "
        "returns where the merged model can be read.",
        "stage_tasks.merge",
        gpu=True,
        configs=("merge",),
        inputs=(
            ("adapter", "Input[Model]"),
            ("merged_model", "Output[Model]"),
            ("metrics", "Output[Metrics]"),
        ),
        returns="str",
    ),
    ComponentSpec(
        "register_model",
        "New MLflow model version, alias challenger; champion when it beats the champion.",
        "stage_tasks.register_model",
        configs=("register",),
        inputs=(
            ("merged_model_uri", "str"),
            ("dataset_digest", "str"),
            ("tuned_eval_loss", "float"),
            ("metrics", "Output[Metrics]"),
        ),
        returns="str",
    ),
    ComponentSpec(
        "pick_best_trial",
        "The grid entry with the lowest tuned eval loss (logged to the parent MLflow run).",
        "bookkeeping_tasks.pick_best_trial",
        inputs=(("lora_grid", "list"), ("eval_losses", "list"), ("metrics", "Output[Metrics]")),
        returns="dict",
    ),
)
