"""``qlora_sweep``: prepare and quantize once, then train + evaluate a grid of LoRA settings.

Each trial is a ``dsl.ParallelFor`` iteration (at most ``parallelism`` at once); its train and
evaluate stages are nested MLflow runs under the one parent run, so the MLflow UI compares the
trials side by side. ``pick-best-trial`` returns the grid entry with the lowest eval loss.
"""

from kfp import dsl
from qlora_kfp.components import (
    evaluate,
    pick_best_trial,
    prepare_dataset,
    quantize,
    train,
)
from qlora_kfp.pipelines import common, platform

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


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="LoRA hyper-parameter sweep on one prepared, quantized base model.",
)
def qlora_sweep(
    base_model: str,
    data_source: str,
    lora_grid: list = DEFAULT_GRID,
    mlflow_experiment: str = "qlora-sweep",
    run_name: str = "",
    max_seq_length: int = 512,
    eval_fraction: float = 0.1,
    seed: int = 42,
    compute_dtype: str = "auto",
    eval_rows: int = 64,
    lora_dropout: float = 0.05,
    num_epochs: float = 1.0,
    max_steps: int = 0,
    batch_size: int = 4,
    warmup_ratio: float = 0.03,
    logging_steps: int = 5,
    num_generations: int = 16,
    max_new_tokens: int = 64,
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    finish = common.exit_task(mlflow_experiment, run_id)

    with dsl.ExitHandler(finish, name="qlora-sweep-stages"):
        tracking, fp = common.open_run(mlflow_experiment, run_name, run_id, base_model, data_source)
        parent = tracking.output

        prep = prepare_dataset(
            data_source=data_source,
            base_model=base_model,
            max_seq_length=max_seq_length,
            eval_fraction=eval_fraction,
            seed=seed,
            cache_fingerprint=fp.output,
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.cpu_task(prep, cache=True)
        quant = quantize(
            base_model=base_model,
            dataset=prep.outputs["dataset"],
            compute_dtype=compute_dtype,
            eval_rows=eval_rows,
            cache_fingerprint=fp.output,
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.gpu_task(quant, cache=True)

        # Loop tasks find the parent MLflow run by the KFP run id (no task output goes in: the
        # local runner misroutes task outputs into loop bodies); trial.after(tracking) orders it.
        with dsl.ParallelFor(items=lora_grid, parallelism=PARALLELISM, name="trials") as trial:
            tr = train(
                quantized_model=quant.outputs["quantized_model"],
                dataset=prep.outputs["dataset"],
                lora_r=trial.lora_r,
                lora_alpha=trial.lora_alpha,
                learning_rate=trial.learning_rate,
                target_modules=trial.target_modules,
                use_dora=trial.use_dora,
                use_rslora=trial.use_rslora,
                lora_dropout=lora_dropout,
                num_epochs=num_epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                warmup_ratio=warmup_ratio,
                logging_steps=logging_steps,
                compute_dtype=compute_dtype,
                seed=seed,
                kfp_run_id=run_id,
            )
            platform.gpu_task(tr, cache=False)
            tr.after(tracking)
            ev = evaluate(
                quantized_model=quant.outputs["quantized_model"],
                adapter=tr.outputs["adapter"],
                dataset=prep.outputs["dataset"],
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                eval_rows=eval_rows,
                compute_dtype=compute_dtype,
                kfp_run_id=run_id,
            )
            platform.gpu_task(ev, cache=False)

        best = pick_best_trial(
            lora_grid=lora_grid,
            eval_losses=dsl.Collected(ev.outputs["Output"]),
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.small_task(best, cache=False)
