"""System metrics log only what the run has: no GPU charts for a CPU-only run."""

from __future__ import annotations

import time

from qlora_kfp.tracking import live, parent_run


def test_a_cpu_only_run_logs_no_gpu_system_metrics(local_mlflow, monkeypatch):
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class HostGpus(BaseMetricsMonitor):
        """What NVML reports on a host with GPUs, whether or not this process may use them."""

        def collect_metrics(self):
            self._metrics["gpu_0_utilization_percentage"].append(0.0)

        def aggregate_metrics(self):
            return {k: sum(v) / len(v) for k, v in self._metrics.items()}

    monkeypatch.setattr(SystemMetricsMonitor, "_initialize_gpu_monitor", lambda self: HostGpus())
    parent = parent_run.start_pipeline_run("sys", "r", {"kfp.run_id": "run-1"})
    for uses_gpu in (False, True):
        monkeypatch.setattr(live, "_uses_gpu", lambda uses_gpu=uses_gpu: uses_gpu)
        run = (
            parent_run.client()
            .create_run(parent_run.client().get_run(parent).info.experiment_id)
            .info
        )
        with live.system_metrics(run.run_id, interval_s=0.2):
            time.sleep(1.5)
        keys = set(parent_run.client().get_run(run.run_id).data.metrics)
        assert "system/cpu_utilization_percentage" in keys
        assert ("system/gpu_0_utilization_percentage" in keys) == uses_gpu, keys
