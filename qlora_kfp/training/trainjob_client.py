"""The Kubernetes API calls a train task makes for its TrainJob, with the ``kubernetes`` client.

In a pod the task acts as its service account (the run's, ``qlora-kfp-runner`` with the Role
of manifests/components/trainjob), in its own namespace; outside one (``qlora-kfp run``) as
the kubeconfig's current context. The API's refusals become one :class:`TrainJobError`
naming the object and what to do (:func:`explained`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kfp import env
from qlora_kfp.errors import ConfigError, TrainJobError
from qlora_kfp.training.trainjob_spec import PYTORCHJOB, TRAINJOB, JobKind

log = logging.getLogger(__name__)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class Cluster:
    """The Kubernetes API (the ``kubernetes`` client's), the namespace to work in, and the
    kind of job object the task creates there (a TrainJob, or a PyTorchJob)."""

    custom: Any  # CustomObjectsApi
    core: Any  # CoreV1Api
    namespace: str
    job: JobKind = TRAINJOB

    def what(self, name: str) -> str:
        """How messages name the job object ``name``."""
        return f"{self.job.kind} {self.namespace}/{name}"

    def coordinates(self) -> tuple[str, str, str, str]:
        """The object's group, version, namespace and plural, as CustomObjectsApi takes them."""
        return self.job.group, self.job.version, self.namespace, self.job.plural


def connect(kubeconfig: str | None = None) -> Cluster:
    """With ``kubeconfig``, its context; else in a pod its service account, in its namespace,
    and outside one the default kubeconfig's (``KUBECONFIG``, ``~/.kube/config``) context."""
    from kubernetes import client, config

    try:
        if kubeconfig:
            raise config.ConfigException("a kubeconfig is given")
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api, namespace = client.ApiClient(configuration), SA_NAMESPACE.read_text().strip()
    except (config.ConfigException, OSError):
        # Read now: the client reads KUBECONFIG once, when it is first imported.
        kubeconfig = kubeconfig or env.text("KUBECONFIG") or None
        try:
            api = config.new_client_from_config(config_file=kubeconfig)
            _, context = config.list_kube_config_contexts(config_file=kubeconfig)
        except config.ConfigException as exc:
            raise ConfigError(
                f"train_runner=trainjob needs a Kubernetes cluster: not in a pod, and the "
                f"kubeconfig ({kubeconfig or '~/.kube/config'}) gives none ({exc}); set "
                "KUBECONFIG, or use train_runner=pod"
            ) from None
        namespace = context["context"].get("namespace") or "default"
    return Cluster(client.CustomObjectsApi(api), client.CoreV1Api(api), namespace)


@contextlib.contextmanager
def explained(what: str) -> Iterator[None]:
    """The API's refusals and failures as one :class:`TrainJobError` naming ``what``."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        try:
            message = json.loads(exc.body)["message"]
        except (TypeError, ValueError, KeyError):
            message = exc.reason
        # A webhook's denial is a 403 too (controller-runtime's admission.Denied), its
        # message its own: an RBAC refusal is the other 403.
        installed = (
            "the Training Operator v1 installed (its PyTorchJob CRD)"
            if what.startswith(PYTORCHJOB.kind + " ")
            else "Kubeflow Trainer v2 installed (its TrainJob CRD)"
        )
        hint = {
            403: "; apply the TrainJob role to the run's service account "
            "(manifests/components/trainjob)",
            404: f"; is {installed} in this cluster?",
        }.get(exc.status, "")
        if "admission webhook" in message:
            hint = ""
            # The Trainer's webhook (pkg/runtime/core/clustertrainingruntime.go ValidateObjects)
            if "ClusterTrainingRuntime" in message and "not found" in message:
                hint = "; set training_runtime to a ClusterTrainingRuntime of the cluster"
        raise TrainJobError(
            f"{what}: {exc.status} {message}{hint}", retryable=exc.status >= 500
        ) from None


def own_pod(cluster: Cluster) -> dict | None:
    """The train task's pod (``KFP_POD_NAME``) as JSON; None outside a KFP pod."""
    name = env.text("KFP_POD_NAME")
    if not name:
        return None
    with explained(f"pod {cluster.namespace}/{name} (the train task's own)"):
        pod = cluster.core.read_namespaced_pod(name, cluster.namespace)
    return cluster.core.api_client.sanitize_for_serialization(pod)


def get(cluster: Cluster, name: str) -> dict | None:
    """The TrainJob ``name``; None when there is none. Other refusals are raised as the
    client's ``ApiException`` (the watch tells a passing one from a lasting one)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return cluster.custom.get_namespaced_custom_object(*cluster.coordinates(), name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create(cluster: Cluster, body: dict) -> dict:
    """Create the TrainJob; one of the same name (an earlier attempt's) is deleted first."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    args = cluster.coordinates()
    try:
        return cluster.custom.create_namespaced_custom_object(*args, body)
    except ApiException as exc:
        if exc.status != 409:
            with explained(cluster.what(name)):
                raise
    log.warning("%s exists (an earlier attempt's): replacing it", cluster.what(name))
    delete(cluster, name)
    wait_gone(cluster, name)
    with explained(cluster.what(name)):
        return cluster.custom.create_namespaced_custom_object(*args, body)


def delete(cluster: Cluster, name: str) -> None:
    """Delete the TrainJob and, before it goes, its JobSet and pods (foreground)."""
    from kubernetes.client.exceptions import ApiException

    body = {"propagationPolicy": "Foreground"}
    try:
        cluster.custom.delete_namespaced_custom_object(*cluster.coordinates(), name, body=body)
    except ApiException as exc:
        if exc.status != 404:
            with explained(cluster.what(name)):
                raise


def wait_gone(cluster: Cluster, name: str, timeout_s: float = 600) -> None:
    """Until the TrainJob ``name`` is gone (its pods stopped, for a foreground deletion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with explained(cluster.what(name)):
            if get(cluster, name) is None:
                return
        if time.monotonic() > deadline:
            raise TrainJobError(
                f"{cluster.what(name)}: still being deleted after {timeout_s:.0f} s (its pods "
                "are stopping, or a finalizer holds it); delete it, then retry",
                retryable=True,
            )
        time.sleep(2)
