"""Preemption-safe training: complete checkpoints only, mirrored to S3, found again on restart.

Transformers' Trainer saves ``checkpoint-<step>`` folders (adapter, optimizer, scheduler, RNG
states, data position) but a pod killed mid-save leaves a partial one that looks like any
other. Here a checkpoint counts only once ``MANIFEST.json`` is written into it after the save
(and, with an ``s3://`` mirror, after its upload, manifest last). A restarted task (a KFP retry
after preemption) resumes from the newest complete checkpoint, local or in S3.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from qlora_kfp.errors import ArtifactError
from qlora_kfp.storage import s3
from qlora_kfp.storage.manifest import MANIFEST, verify, write_manifest

log = logging.getLogger(__name__)
STEP = re.compile(r"^checkpoint-(\d+)$")


def _complete(folder: Path) -> bool:
    try:
        verify(folder, "train-checkpoint")
        return True
    except ArtifactError:
        return False


def latest_local(root: Path) -> Path | None:
    """Newest complete checkpoint under ``root``; partial ones are removed."""
    if not root.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP.match(p.name))
    )
    for _, path in reversed(found):
        if _complete(path):
            return path
        log.warning("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def latest_remote(uri: str, root: Path) -> Path | None:
    """Download the newest checkpoint under ``uri`` whose manifest exists."""
    bucket, prefix = s3.split_uri(uri)
    client = s3.client()
    steps = set()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/"
    ):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and STEP.match(parts[0]):
                steps.add(int(STEP.match(parts[0]).group(1)))
    if not steps:
        return None
    name = f"checkpoint-{max(steps)}"
    dest = s3.download_folder(f"{uri}/{name}", root / name)
    return dest if _complete(dest) else None


def find_resume_point(root: Path, uri: str = "") -> str | None:
    """Local first (a retried local task), else the S3 mirror (a new pod)."""
    path = latest_local(root) or (latest_remote(uri, root) if uri else None)
    if path:
        log.info("resuming from %s", path)
    return str(path) if path else None


def callback(root: Path, uri: str = ""):
    """A TrainerCallback that seals each saved checkpoint and mirrors it to S3."""
    from transformers import TrainerCallback

    class SealCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            path = root / f"checkpoint-{state.global_step}"
            if path.is_dir():
                write_manifest(path, "train-checkpoint")
                if uri:
                    s3.upload_folder(path, f"{uri}/{path.name}")
            return control

    return SealCheckpoint()
