"""Atomic artifacts: an interrupted write leaves nothing that looks complete."""

from __future__ import annotations

import pytest

from qlora_kfp.errors import ArtifactError
from qlora_kfp.storage.manifest import MANIFEST, atomic_folder, verify


def test_complete_write_has_a_verifiable_manifest(tmp_path):
    with atomic_folder(tmp_path / "art", "test") as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hi")
    m = verify(tmp_path / "art", "test")
    assert set(m["files"]) == {"a.bin", "sub/b.txt"} and m["files"]["a.bin"]["size"] == 100


def test_interrupted_write_leaves_no_artifact(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "art", "test") as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # as if the pod were stopped mid-write
    assert not (tmp_path / "art").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_folder_survives_a_failed_rewrite(tmp_path):
    with atomic_folder(tmp_path / "art", "test") as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "art", "test") as tmp:
        (tmp / "a.bin").write_bytes(b"new")
        raise RuntimeError("disk full")
    assert (tmp_path / "art" / "a.bin").read_bytes() == b"old"
    verify(tmp_path / "art", "test")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / MANIFEST).unlink(), "no MANIFEST.json"),
        (lambda d: (d / "a.bin").unlink(), "a.bin listed in MANIFEST.json is missing"),
        (lambda d: (d / "a.bin").write_bytes(b"y" * 10), "a.bin does not match its checksum"),
    ],
    ids=["no-manifest", "missing-file", "corrupt-file"],
)
def test_verify_catches_damage(tmp_path, damage, message):
    with atomic_folder(tmp_path / "art", "test") as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 10)
    damage(tmp_path / "art")
    with pytest.raises(ArtifactError, match=message):
        verify(tmp_path / "art")


def test_wrong_kind_is_rejected(tmp_path):
    with atomic_folder(tmp_path / "art", "adapter"):
        pass
    with pytest.raises(ArtifactError, match="is a 'adapter' artifact, expected 'dataset'"):
        verify(tmp_path / "art", "dataset")
