"""Where tasks run: resources, GPU node pools, caching. The one place for pod settings."""

from kfp import dsl


def small_task(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
    task.set_caching_options(cache)
    task.set_cpu_request("250m").set_memory_request("512Mi")
    return task


def cpu_task(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
    task.set_caching_options(cache)
    task.set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("16Gi")
    return task


def gpu_task(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
    task.set_caching_options(cache)
    task.set_cpu_request("4").set_memory_request("32Gi").set_memory_limit("64Gi")
    return task
