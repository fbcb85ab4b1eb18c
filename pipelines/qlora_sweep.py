"""``qlora_sweep``: prepare and quantize once, then train + evaluate a grid of LoRA settings.

Each trial is a ``dsl.ParallelFor`` iteration (at most ``PARALLELISM`` at once) whose grid
entry overrides the train parameters; its train and evaluate stages are nested MLflow runs
under the one parent run, so the MLflow UI compares the trials side by side. ``pick-best-trial`` returns the grid entry with the lowest eval loss.
"""

from kfp import dsl
from qlora_kfp.components import pick_best_trial
from qlora_kfp.pipelines import common, platform
from qlora_kfp.pipelines.params import inputs_for, pipeline_params

from qlora_kfp import configs

PIPELINE_NAME = "qlora-sweep"
DEFAULT_GRID = [
    {
        "lora_r": 8,
        "lora_alpha": 16,
        "learning_rate": 2e-4,
        "target_modules": "all-linear",
        "use_dora": False,
        "use_rslora": False,
    },
    {
        "lora_r": 16,
        "lora_alpha": 32,
        "learning_rate": 2e-4,
        "target_modules": "all-linear",
        "use_dora": False,
        "use_rslora": False,
    },
    {
        "lora_r": 64,
        "lora_alpha": 16,
        "learning_rate": 1e-4,
        "target_modules": "all-linear",
        "use_dora": False,
        "use_rslora": True,
    },
]
PARALLELISM = 2  # trials at once: bounds the GPUs one sweep can hold


@dsl.pipeline(name=PIPELINE_NAME)
@pipeline_params(
    configs.PrepareConfig,
    configs.QuantizeConfig,
    configs.TrainConfig,
    configs.EvaluateConfig,
    configs.PipelineConfig,
    extra=(
        (
            "lora_grid",
            list,
            DEFAULT_GRID,
            "Trials: each entry sets train parameters (lora_r, learning_rate, ...) for one "
            "trial over the pipeline's own train parameters.",
        ),
    ),
    exclude=("force_retrain",),
    defaults={"mlflow_experiment": "qlora-sweep"},
)
def qlora_sweep(p: dict) -> None:
    """LoRA hyper-parameter sweep on one prepared, quantized base model."""
    finish = common.exit_task(p)

    with dsl.ExitHandler(finish, name="qlora-sweep-stages"):
        run = common.open_run(p, PIPELINE_NAME)
        prep = common.prepare(run)
        quant = common.quantize_model(run, prep)

        # Loop tasks find the parent MLflow run by the KFP run id (no task output goes in: the
        # local runner misroutes task outputs into loop bodies); trial.after(tracking) orders it.
        in_loop = {k: v for k, v in run.params.items() if k != "mlflow_parent_run_id"}
        with dsl.ParallelFor(items=p["lora_grid"], parallelism=PARALLELISM, name="trials") as trial:
            tr, ev = common.train_and_evaluate(in_loop, quant, prep, overrides=trial)
            tr.after(run.tracking)

        best = pick_best_trial(
            **inputs_for(
                pick_best_trial,
                run.params,
                eval_losses=dsl.Collected(ev.outputs["Output"]),
            )
        )
        platform.small_task(best, cache=False)
