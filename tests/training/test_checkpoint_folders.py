"""The train stage's checkpoint folder: its own checkpoints are resumed or removed, and a
user's folder that merely has a checkpoint's name is never touched."""

from __future__ import annotations

import pytest

from qlora_kfp.errors import ArtifactError
from qlora_kfp.training import resume

WANTED = {"config": {"lora_r": 8}, "dataset_digest": "d", "model_digest": "m"}


def _cut_off(root, step):
    """What a pod killed mid-save leaves: some of the Trainer's files, no manifest."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "optimizer.pt").write_bytes(b"\0")
    return path


def _users(root, step):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def test_a_cut_off_checkpoint_is_removed(tmp_path):
    cut = _cut_off(tmp_path, 4)
    assert resume.find_resume_point(tmp_path, WANTED) is None
    assert not cut.exists()


def test_a_users_folder_named_like_a_checkpoint_is_refused_and_kept(tmp_path):
    mine = _users(tmp_path, 5)
    with pytest.raises(ArtifactError, match=r"checkpoint-5: holds files .* move that folder out"):
        resume.find_resume_point(tmp_path, WANTED)
    resume.remove_all(tmp_path)  # the clean-up after a finished training
    with pytest.raises(ValueError), resume.saving(tmp_path):  # ... and after a failed one
        raise ValueError("training failed")
    assert (mine / "notes.txt").read_text() == "mine"
