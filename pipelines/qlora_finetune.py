"""``qlora_finetune``: prepare -> quantize -> train -> evaluate -> merge -> register.

Parameter names are the stage config fields (``qlora_kfp.configs``): one name, one meaning,
from the CLI to the component, the pipeline and MLflow. This module only wires tasks.
"""

from kfp import dsl
from qlora_kfp.components import decide_training, merge, register_model
from qlora_kfp.pipelines import common, platform
from qlora_kfp.pipelines.params import inputs_for, pipeline_params

from qlora_kfp import configs

PIPELINE_NAME = "qlora-finetune"


@dsl.pipeline(name=PIPELINE_NAME)
@pipeline_params(*configs.ALL_CONFIGS)
def qlora_finetune(p: dict) -> None:
    """QLoRA fine-tuning: dataset preparation, NF4 quantization, LoRA training, evaluation and
    adapter merging, logged to MLflow."""
    finish = common.exit_task(p)

    with dsl.ExitHandler(finish, name="qlora-stages"):
        run = common.open_run(p, PIPELINE_NAME)  # tracking, fingerprint and preflight
        prep = common.prepare(run)

        decision = decide_training(
            **inputs_for(
                decide_training,
                run.params,
                dataset_digest=prep.outputs["Output"],
                cache_fingerprint=run.fingerprint.output,
            )
        )
        platform.small_task(decision, cache=False)

        # Retraining claims no GPU when the champion was made from exactly this data, base model,
        # code and settings.
        with dsl.If(decision.output == "train", name="data-changed"):
            quant = common.quantize_model(run, prep)
            tr, ev = common.train_and_evaluate(run.params, quant, prep)

            mg = merge(**inputs_for(merge, run.params, adapter=tr.outputs["adapter"]))
            mg.after(ev)  # never publish a merged model whose evaluation failed
            platform.gpu_task(mg, cache=False, params=run.params)

            reg = register_model(
                **inputs_for(
                    register_model,
                    run.params,
                    merged_model_uri=mg.outputs["Output"],
                    dataset_digest=prep.outputs["Output"],
                    tuned_eval_loss=ev.outputs["Output"],
                )
            )
            platform.small_task(reg, cache=False)
