"""Preemption-safe training: complete checkpoints only, mirrored to S3, found again on restart.

Transformers' Trainer saves ``checkpoint-<step>`` folders (adapter, optimizer, scheduler, RNG
states, data position) but a pod killed mid-save leaves a partial one that looks like any
other. Here a checkpoint counts only once ``MANIFEST.json`` is written into it after the save
(and, with an ``s3://`` mirror, after its upload, manifest last). A restarted task (a KFP retry
after preemption) resumes from the newest complete checkpoint, local or in S3, *of the same
run*: the manifest records what the checkpoint was made from (the settings that change what is
learned, the prepared dataset's digest, the quantized model's digest), and a checkpoint made
from anything else is never resumed. A rerun with another learning rate, dataset or LoRA rank
starts fresh, and says why.

"Checkpoint" here means a resumable training state: Transformers' ``checkpoint-<step>`` folder.
Elsewhere the word means gradient checkpointing (recomputing activations: ``modeling``,
``memory``, ``autofit``, ``offload``) or, in Hugging Face usage, a base model's weights files
(``shards``, the quantize stage), which the code calls weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from qlora_kfp.configs import RESULT_INDEPENDENT, TrainConfig, result_settings, setting_changes
from qlora_kfp.errors import ArtifactError, OutputError
from qlora_kfp.storage import s3
from qlora_kfp.storage.manifest import MANIFEST, read_manifest, verify, write_manifest
from qlora_kfp.storage.writes import write_error
from qlora_kfp.training import distributed

log = logging.getLogger(__name__)
STEP = re.compile(r"^checkpoint-(\d+)$")
KIND = "train-checkpoint"
# Settings a restart may change and still resume (e.g. turn gradient checkpointing on after
# running out of memory): the one definition of what does not change the result.
RESUME_INDEPENDENT = RESULT_INDEPENDENT


def made_from(cfg: TrainConfig, dataset_digest: str, model_digest: str) -> dict:
    """What a checkpoint of this run is made from; resuming needs all of it to match."""
    config = result_settings(dataclasses.asdict(cfg), ("train",))
    return {"config": config, "dataset_digest": dataset_digest, "model_digest": model_digest}


def differences(recorded: dict | None, wanted: dict) -> list[str]:
    """How a checkpoint's record differs from this run's (empty: it may be resumed)."""
    if not recorded:
        return ["it does not record what it was made from (an older version wrote it)"]
    out = setting_changes(recorded.get("config", {}), wanted["config"])
    for key, what in (("dataset_digest", "dataset"), ("model_digest", "quantized model")):
        if recorded.get(key) != wanted[key]:
            out.append(f"{what} {recorded.get(key)} -> {wanted[key]}")
    return out


# What transformers' Trainer (and peft, and this module) write into a checkpoint folder: a
# cut-off checkpoint holds some of these and nothing else.
TRAINER_FILES = re.compile(
    r"^(adapter_model\.safetensors|adapter_config\.json|README\.md|config\.json"
    r"|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(_fsdp\w*)?\.bin|optimizer(_\d+)?\.(pt|bin)|scheduler\.pt|scaler\.pt"
    r"|rng_state(_\d+)?\.pth|trainer_state\.json|training_args\.bin|tokenizer\.(json|model)"
    r"|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|vocab\.json"
    r"|merges\.txt|chat_template\.jinja|MANIFEST\.json(\.tmp)?)$"
)


def _is_ours(path: Path) -> bool:
    """A checkpoint folder this stage wrote, sealed or cut off: no other file is in it."""
    return all(p.is_file() and TRAINER_FILES.match(p.name) for p in path.iterdir())


def _steps(root: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders under ``root`` that this stage wrote, newest first.

    A folder of that name holding anything else is someone's own: never touched.
    """
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and (m := STEP.match(p.name)):
            if _is_ours(p):
                found.append((int(m.group(1)), p))
            else:
                log.warning("leaving %s alone: it holds files a checkpoint never has", p)
    return sorted(found, reverse=True)


def check_root(root: Path) -> None:
    """Refuse a checkpoint folder holding someone's folder named like a checkpoint: the
    Trainer would save into it, and rotating checkpoints would delete it.

    Raises:
        ArtifactError: naming the folder to move.
    """
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.is_dir() and STEP.match(p.name) and not _is_ours(p):
            raise ArtifactError(
                f"{p}: holds files a training checkpoint never has; the train stage saves "
                f"its checkpoints in {root}: move that folder out"
            )


def latest_local(root: Path, wanted: dict) -> Path | None:
    """Newest complete checkpoint under ``root`` made from ``wanted``.

    Incomplete ones are removed, and so are complete ones made from other inputs: this run
    can never resume them, and the Trainer would otherwise save into and rotate among them.
    Nothing else under ``root`` is touched.
    """
    for _, path in _steps(root):
        try:
            why = differences(read_manifest(path).get("made_from"), wanted)
            if not why:
                verify(path, KIND)
                return path
        except (ArtifactError, ValueError):  # no manifest, a cut-off one, or damaged files
            log.warning("removing incomplete checkpoint %s", path)
        else:
            log.warning(
                "not resuming from %s, it was made from other inputs (%s); starting fresh "
                "and removing it",
                path,
                "; ".join(why),
            )
        shutil.rmtree(path, ignore_errors=True)
    return None


def latest_remote(uri: str, root: Path, wanted: dict) -> Path | None:
    """Download the newest checkpoint under ``uri`` that is sealed and made from ``wanted``.

    Another run's checkpoints under the same prefix are skipped (their manifests are read, not
    their weights), never deleted: they may belong to a run that is still going.
    """
    bucket, prefix = s3.split_uri(uri)
    steps = set()
    for page in (
        s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    ):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and (m := STEP.match(parts[0])):
                steps.add(int(m.group(1)))
    for step in sorted(steps, reverse=True):
        name = f"checkpoint-{step}"
        manifest = json.loads(s3.read_text(f"{uri}/{name}/{MANIFEST}"))
        why = differences(manifest.get("made_from"), wanted)
        if why:
            log.warning(
                "not resuming from %s/%s, it was made from other inputs (%s)",
                uri,
                name,
                "; ".join(why),
            )
            continue
        dest = s3.download_folder(f"{uri}/{name}", root / name)
        try:
            verify(dest, KIND)
        except ArtifactError as exc:
            log.warning("not resuming from %s/%s: %s", uri, name, exc)
            shutil.rmtree(dest, ignore_errors=True)
            continue
        return dest
    return None


def find_resume_point(root: Path, wanted: dict, uri: str = "") -> str | None:
    """Local first (a retried local task), else the S3 mirror (a new pod)."""
    check_root(root)
    path = latest_local(root, wanted) or (latest_remote(uri, root, wanted) if uri else None)
    if path:
        log.info("resuming from %s", path)
    return str(path) if path else None


def callback(root: Path, wanted: dict, uri: str = ""):
    """A TrainerCallback that seals each saved checkpoint and mirrors it to S3.

    With several processes (DDP) rank 0 saves the adapter and optimizer and every rank its own
    RNG state; the seal waits for all of them and rank 0 alone writes it."""
    from transformers import TrainerCallback

    class SealCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            distributed.barrier()  # every rank's files are in before the manifest lists them
            path = root / f"checkpoint-{state.global_step}"
            if distributed.is_main() and path.is_dir():
                write_manifest(path, KIND, {"made_from": wanted})
                if uri:
                    # An older manifest under this name must not vouch for the new files
                    # while they upload (upload_folder puts the manifest last).
                    s3.delete_object(f"{uri}/{path.name}/{MANIFEST}")
                    s3.upload_folder(path, f"{uri}/{path.name}")
            return control

    return SealCheckpoint()


@contextlib.contextmanager
def saving(root: Path) -> Iterator[None]:
    """Around training: when it fails, remove the checkpoint it was cutting off.

    A checkpoint cut off by a full disk would keep the disk full; the sealed ones stay, to
    resume from once there is space. A failed write becomes one :class:`OutputError`.
    """
    try:
        yield
    except BaseException as exc:
        for _, path in _steps(root):
            if not (path / MANIFEST).is_file():
                log.warning("removing the unfinished checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)
        err = write_error(exc, root) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise OutputError(
            f"{err}; the complete checkpoints there are kept to resume from "
            "(checkpoint_steps=0 saves none)",
            retryable=err.retryable,
        ) from None


def remove_all(root: Path) -> None:
    """Remove every checkpoint under ``root``, and ``root`` if nothing else is in it."""
    for _, path in _steps(root):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()
