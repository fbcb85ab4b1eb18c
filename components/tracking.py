"""KFP components: open the pipeline's parent MLflow run, and the exit handler."""

from kfp import dsl
from kfp.dsl import Markdown, Output, PipelineTaskFinalStatus
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(
    mlflow_experiment: str, run_name: str, kfp_run_id: str, base_model: str, data_source: str
) -> str:
    """Check MLflow and S3 before any GPU is claimed, then create the parent MLflow run."""
    from qlora_kfp import entrypoints

    return entrypoints.start_tracking(locals())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_tracking(
    mlflow_experiment: str,
    kfp_run_id: str,
    status: PipelineTaskFinalStatus,
    report: Output[Markdown],
):
    """Exit handler: close the parent run, write the run report, post the webhook, clean up."""
    from qlora_kfp import entrypoints

    entrypoints.finish(locals())
