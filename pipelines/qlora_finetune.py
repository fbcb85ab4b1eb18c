"""``qlora_finetune``: prepare -> quantize -> train -> evaluate -> merge, tracked in MLflow.

Parameter names are the stage config fields (see ``qlora_kfp.configs``): one name, one meaning,
from the CLI to the component, the pipeline and MLflow.
"""

from kfp import dsl
from qlora_kfp.components import (
    decide_training,
    evaluate,
    merge,
    preflight,
    prepare_dataset,
    quantize,
    register_model,
    train,
)
from qlora_kfp.pipelines import common, platform

PIPELINE_NAME = "qlora-finetune"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="QLoRA fine-tuning: dataset preparation, NF4 quantization, LoRA "
    "training, evaluation and adapter merging, logged to MLflow.",
)
def qlora_finetune(
    base_model: str,
    data_source: str,
    mlflow_experiment: str = "qlora-finetune",
    run_name: str = "",
    # prepare-dataset
    data_format: str = "auto",
    chat_template: str = "auto",
    max_seq_length: int = 512,
    overlong: str = "drop",
    train_on_prompt: bool = False,
    eval_fraction: float = 0.1,
    max_rows: int = 0,
    seed: int = 42,
    # quantize
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    eval_rows: int = 64,
    # train
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str = "all-linear",
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
    logging_steps: int = 5,
    length_grouping: bool = True,
    packing: str = "padding_free",
    pack_length: int = 0,
    fp32_upcast: bool = False,
    fused_kernels: str = "auto",
    fused_lora: bool = True,
    attn_implementation: str = "auto",
    # evaluate
    num_generations: int = 16,
    max_new_tokens: int = 64,
    # merge
    merge_dtype: str = "bfloat16",
    # register
    registered_model_name: str = "qlora-finetune",
    force_retrain: bool = False,
    gpu_memory_gib: float = 80.0,
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    finish = common.exit_task(mlflow_experiment, run_id)

    with dsl.ExitHandler(finish, name="qlora-stages"):
        tracking, fp = common.open_run(mlflow_experiment, run_name, run_id, base_model, data_source)
        parent = tracking.output

        check = preflight(
            base_model=base_model,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            lora_r=lora_r,
            gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_layers=gradient_checkpointing_layers,
            fused_kernels=fused_kernels,
            packing=packing,
            pack_length=pack_length,
            fp32_upcast=fp32_upcast,
            attn_implementation=attn_implementation,
            gpu_memory_gib=gpu_memory_gib,
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.small_task(check, cache=False)

        prep = prepare_dataset(
            cache_fingerprint=fp.output,
            data_source=data_source,
            base_model=base_model,
            data_format=data_format,
            chat_template=chat_template,
            max_seq_length=max_seq_length,
            overlong=overlong,
            train_on_prompt=train_on_prompt,
            eval_fraction=eval_fraction,
            max_rows=max_rows,
            seed=seed,
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.cpu_task(prep, cache=True)

        decision = decide_training(
            dataset_digest=prep.outputs["Output"],
            registered_model_name=registered_model_name,
            force_retrain=force_retrain,
            mlflow_parent_run_id=parent,
            kfp_run_id=run_id,
        )
        platform.small_task(decision, cache=False)
        decision.after(check)  # no GPU task starts before the memory check has passed

        # Scheduled retraining claims no GPU when the champion already saw this exact data.
        with dsl.If(decision.output == "train", name="data-changed"):
            quant = quantize(
                cache_fingerprint=fp.output,
                base_model=base_model,
                dataset=prep.outputs["dataset"],
                quant_type=quant_type,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                eval_rows=eval_rows,
                mlflow_parent_run_id=parent,
                kfp_run_id=run_id,
            )
            platform.gpu_task(quant, cache=True)

            tr = train(
                quantized_model=quant.outputs["quantized_model"],
                dataset=prep.outputs["dataset"],
                lora_r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=target_modules,
                learning_rate=learning_rate,
                lr_scheduler=lr_scheduler,
                warmup_ratio=warmup_ratio,
                num_epochs=num_epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_layers=gradient_checkpointing_layers,
                optimizer=optimizer,
                logging_steps=logging_steps,
                length_grouping=length_grouping,
                packing=packing,
                pack_length=pack_length,
                fp32_upcast=fp32_upcast,
                fused_kernels=fused_kernels,
                fused_lora=fused_lora,
                attn_implementation=attn_implementation,
                compute_dtype=compute_dtype,
                seed=seed,
                mlflow_parent_run_id=parent,
                kfp_run_id=run_id,
            )
            platform.gpu_task(tr, cache=False)

            ev = evaluate(
                quantized_model=quant.outputs["quantized_model"],
                adapter=tr.outputs["adapter"],
                dataset=prep.outputs["dataset"],
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                eval_rows=eval_rows,
                compute_dtype=compute_dtype,
                mlflow_parent_run_id=parent,
                kfp_run_id=run_id,
            )
            platform.gpu_task(ev, cache=False)

            mg = merge(
                base_model=base_model,
                adapter=tr.outputs["adapter"],
                merge_dtype=merge_dtype,
                mlflow_parent_run_id=parent,
                kfp_run_id=run_id,
            )
            mg.after(ev)  # never publish a merged model whose evaluation failed
            platform.gpu_task(mg, cache=False)

            reg = register_model(
                merged_model=mg.outputs["merged_model"],
                base_model=base_model,
                dataset_digest=prep.outputs["Output"],
                tuned_eval_loss=ev.outputs["Output"],
                registered_model_name=registered_model_name,
                mlflow_parent_run_id=parent,
                kfp_run_id=run_id,
            )
            platform.small_task(reg, cache=False)
