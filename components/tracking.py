"""KFP components: open and close the pipeline's parent MLflow run."""

from kfp import dsl
from kfp.dsl import PipelineTaskFinalStatus
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(
    mlflow_experiment: str, run_name: str, kfp_run_id: str, base_model: str, data_source: str
) -> str:
    """Check MLflow and S3 before any GPU is claimed, then create the parent MLflow run."""
    from qlora_kfp import entrypoints

    return entrypoints.start_tracking(locals())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_tracking(mlflow_experiment: str, kfp_run_id: str, status: PipelineTaskFinalStatus):
    """Exit handler: close the parent run as FINISHED or FAILED with the reason."""
    from qlora_kfp import tracking

    tracking.finish_pipeline_run(
        mlflow_experiment, kfp_run_id, status.state, status.error_message or ""
    )
