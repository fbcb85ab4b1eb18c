"""A TrainJob's node 0 log in the train task's: its lines echoed, its training rows relayed.

Node 0 holds global rank 0, which logs the training rows (:mod:`qlora_kfp.stages.train_nodes`
prints each after :data:`ROW_MARK`): the task hands them to ``on_log``, so MLflow shows every
step as it happens, as when the task's own pod trains.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qlora_kfp.training.trainjob_spec import NODE, TRAINJOB

log = logging.getLogger(__name__)
ROW_MARK = "qlora-kfp-row: "
# A TrainJob's node-0 pods (trainjob_spec.TRAINJOB; a cluster's kind has its own).
NODE0_SELECTOR = TRAINJOB.node0_selector


def relay(lines: Iterable[str], on_row: Callable[[dict], None] | None, echo=print) -> None:
    """Node 0's log: each marked line a training row for ``on_row``, the others echoed."""
    for line in lines:
        at = line.find(ROW_MARK)
        if at < 0:
            echo(line)
            continue
        try:
            row = json.loads(line[at + len(ROW_MARK) :])
        except ValueError:  # cut off, e.g. by a killed process
            echo(line)
            continue
        if on_row is not None:
            on_row(row)


def _node0(cluster: Any, name: str) -> dict | None:
    """Node 0's newest pod whose container has started (a restarted JobSet makes new ones)."""
    kind = getattr(cluster, "job", TRAINJOB)
    pods = cluster.core.list_namespaced_pod(
        cluster.namespace, label_selector=kind.node0_selector.format(name)
    ).items
    started = [
        p
        for p in pods
        if any(
            s.name == kind.container and (s.state.running or s.state.terminated)
            for s in p.status.container_statuses or []
        )
    ]
    return max(started, key=lambda p: p.metadata.creation_timestamp, default=None)


def follow_logs(cluster: Any, name: str, on_row, stop: threading.Event, poll_s: float = 5) -> None:
    """Until ``stop``: follow the log of each node-0 pod the TrainJob gets, in turn, through
    :func:`relay`. Never raises: a log that cannot be read only costs the task its echo."""
    followed: set[str] = set()
    while not stop.is_set():
        try:
            pod = _node0(cluster, name)
            if pod is None or pod.metadata.uid in followed:
                stop.wait(poll_s)
                continue
            container = getattr(cluster, "job", TRAINJOB).container
            stream = cluster.core.read_namespaced_pod_log(
                pod.metadata.name,
                cluster.namespace,
                container=container,
                follow=True,
                _preload_content=False,
            )
            followed.add(pod.metadata.uid)
            lines = (raw.decode(errors="replace") for raw in stream)
            relay(_split(lines), on_row, lambda line: print(f"[{NODE}-0] {line}", flush=True))
        except Exception as exc:  # noqa: BLE001 - the watch, not the log, decides the outcome
            log.warning("reading the log of %s's node 0: %s", name, exc)
            stop.wait(poll_s)


def _split(chunks: Iterable[str]) -> Iterator[str]:
    """Whole lines of a stream of chunks."""
    rest = ""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split("\n")
        yield from lines
    if rest:
        yield rest
