"""Create a TrainJob, watch it to its end, relay its node 0's log, and cancel it.

The train task is the TrainJob's client for its whole life: it creates it (:func:`run`),
watches its conditions with a resourceVersion'd watch that reads it again after a 410 Gone
and ends each watch after ``watch_s`` (:func:`wait`), streams node 0's log into its own
(:mod:`~qlora_kfp.training.trainjob_logs`, whose rows reach ``on_log`` as in a pod), and
deletes it when the task is stopped (SIGTERM: KFP terminating the run) or fails. An API
server that does not answer for a while (restarted, upgraded) is waited for, up to
``API_PATIENCE_S``: the training goes on meanwhile.

The conditions are Trainer v2.0.0's (pkg/apis/trainer/v1alpha1/trainjob_types.go):
``Complete`` and ``Failed``, copied from the JobSet's ``Completed``/``Failed`` with its reason
and message (pkg/runtime/framework/plugins/jobset/jobset.go, TerminalCondition; JobSet's
reasons: ``AllJobsCompleted``, ``FailedJobs``, ``ReachedMaxRestarts``...), or ``Failed`` with
``TrainingRuntimeNotSupported``; ``Suspended`` (e.g. queued by Kueue) is only logged. A
PyTorchJob's (``train_runner=pytorchjob``; Training Operator v1.8.1, pkg/apis/kubeflow.org/v1/
common_types.go): ``Succeeded`` and ``Failed``; ``Created``, ``Running``, ``Restarting`` and
``Suspended`` are on the way. The kind's (``cluster.job``) says which end it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

from qlora_kfp.errors import TrainJobError, TrainJobFailed
from qlora_kfp.training import trainjob_logs
from qlora_kfp.training.trainjob_client import Cluster, create, delete, explained, get

log = logging.getLogger(__name__)
WATCH_S = 300  # one watch's server-side timeout; then the watch starts again where it was
API_PATIENCE_S, API_RETRY_S = 600, 5.0  # how long, and how often, an unanswering API is asked


class Cancelled(BaseException):
    """SIGTERM while the TrainJob runs: KFP terminating the run (not an error to catch)."""


@contextlib.contextmanager
def cancel_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Cancelled` in this (the main) thread; a blocking read of the
    watch is interrupted by it (PEP 475: a handler that raises ends the system call).

    A terminated run's pod gets it from Argo's executor, which forwards the signals it gets
    to the command it started (KFP's launcher, in a process group of its own with this
    process): argo-workflows cmd/argoexec/commands/emissary.go, osspecific/command_unix.go.
    """

    def handler(signum, frame):
        raise Cancelled(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only it may have handlers
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _ended(cluster: Cluster, name: str, obj: dict | None) -> bool:
    """Whether ``obj`` (the job object, None when gone) is done (a TrainJob Complete, a
    PyTorchJob Succeeded).

    Raises:
        TrainJobFailed: it is Failed, naming the condition's reason and message.
        TrainJobError: it is gone, or being deleted, by someone else.
    """
    what = cluster.what(name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        raise TrainJobError(
            f"{what}: deleted while it trained (not by the train task); run the pipeline "
            "again to train"
        )
    conditions = (obj.get("status") or {}).get("conditions") or []
    on = {c["type"]: c for c in conditions if c.get("status") == "True"}
    if cluster.job.failed in on:
        failed = on[cluster.job.failed]
        reason, message = failed.get("reason", ""), failed.get("message", "")
        raise TrainJobFailed(
            f"{what} failed ({reason}: {message}); its nodes' logs say why",
            retryable=True,  # a node lost or preempted: a retry resumes from the checkpoints
        )
    if "Suspended" in on:
        log.info("%s is suspended (%s)", what, on["Suspended"].get("message"))
    return cluster.job.done in on


def wait(cluster: Cluster, name: str, watch_s: int = WATCH_S) -> dict:
    """Watch the TrainJob until it is Complete; returns it then.

    Raises:
        TrainJobFailed: it ended Failed.
        TrainJobError: it was deleted, or the API refused the watch or did not answer for
            ``API_PATIENCE_S``.
    """
    import urllib3
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    version, down_since = "", 0.0
    while True:
        try:
            if not version:  # (again) from a fresh read: the first time, after a 410 Gone
                obj = get(cluster, name)
                if _ended(cluster, name, obj):
                    return obj
                version = obj["metadata"]["resourceVersion"]
            for event in watch.Watch().stream(
                cluster.custom.list_namespaced_custom_object,
                *cluster.coordinates(),
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=watch_s,
                _request_timeout=watch_s + 30,  # a connection that died without closing
            ):
                obj = event["raw_object"]
                if _ended(cluster, name, None if event["type"] == "DELETED" else obj):
                    return obj
                version = obj["metadata"]["resourceVersion"]
            down_since = 0.0
        except ApiException as exc:
            if exc.status == 410:
                log.info("the watch of %s expired (410 Gone): reading it again", name)
                version = ""
                continue
            if exc.status < 500 and exc.status != 429:
                with explained(cluster.what(name)):
                    raise
            down_since = _unanswered(cluster.what(name), exc, down_since)
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out
            down_since = _unanswered(cluster.what(name), exc, down_since)
            version = ""


def _unanswered(what: str, exc: Exception, since: float) -> float:
    """Wait a while for an API that did not answer (since ``since``, 0: until now)."""
    now = time.monotonic()
    since = since or now
    if now - since > API_PATIENCE_S:
        raise TrainJobError(
            f"{what}: the Kubernetes API has not answered for {API_PATIENCE_S} s ({exc}); the "
            "TrainJob may still be running: look at it, or retry",
            retryable=True,
        )
    log.warning("watching %s: the API did not answer (%s); asking again", what, exc)
    time.sleep(API_RETRY_S)
    return since


def run(cluster: Cluster, body: dict, on_row=None, watch_s: int = WATCH_S) -> dict:
    """Create the TrainJob, relay node 0's log, and wait for its end; returns it Complete.
    On SIGTERM, or a failure of the task's own, it is deleted (a Failed one is left to read).

    Raises:
        TrainJobFailed: it ended Failed.
        TrainJobError: cancelled (SIGTERM), deleted by someone, or refused.
    """
    name = body["metadata"]["name"]
    stop = threading.Event()
    relayer = threading.Thread(
        target=trainjob_logs.follow_logs,
        args=(cluster, name, on_row, stop),
        daemon=True,
        name="node0-log",
    )
    ended = False
    try:
        with cancel_on_sigterm():
            create(cluster, body)
            log.info("created %s; waiting for it to end", cluster.what(name))
            relayer.start()
            try:
                final = wait(cluster, name, watch_s)
            except TrainJobFailed:
                ended = True  # left for its pods' logs: its JobSet stopped the nodes
                raise
        ended = True
        stop.set()
        relayer.join(timeout=30)  # node 0's last rows: its pod has ended, so has its log
        return final
    except Cancelled as exc:
        delete(cluster, name)
        ended = True
        raise TrainJobError(
            f"{cluster.what(name)}: deleted, the train task was stopped ({exc}: the run "
            "was terminated)"
        ) from None
    finally:
        stop.set()
        if not ended:
            with contextlib.suppress(Exception):
                delete(cluster, name)
