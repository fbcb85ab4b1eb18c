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


def _user_folder(tmp_path):
    src = tmp_path / "mydata"
    src.mkdir()
    (src / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return src


@pytest.mark.parametrize(
    "where,message",
    [
        pytest.param("user-folder", "holds files that are not an artifact", id="non-empty-folder"),
        pytest.param("other-kind", "holds a 'adapter' artifact", id="another-stages-artifact"),
        pytest.param("the-input", "it holds the input", id="the-input-file"),
        pytest.param("parent-of-input", "it holds the input", id="a-folder-above-the-input"),
        pytest.param("cwd", "over the working folder", id="dot"),
        pytest.param("root", "over the root folder", id="root"),
        pytest.param("home", "over your home folder", id="home"),
        pytest.param("a-file", "is a file", id="a-file"),
        pytest.param(
            "own-kind-plus-user-file", "does not list \\(notes.txt\\)", id="user-file-in-artifact"
        ),
        pytest.param("inside-input", "inside the input", id="inside-an-input-folder"),
    ],
)
def test_a_stage_never_overwrites_what_is_not_its_own(tmp_path, monkeypatch, where, message):
    from qlora_kfp.storage.manifest import atomic_folder

    src = _user_folder(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path if where == "cwd" else tmp_path / "home" / "elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    other = tmp_path / "adapter"
    with atomic_folder(other, "adapter") as tmp:
        (tmp / "w").write_text("x")
    own = tmp_path / "earlier-dataset"
    with atomic_folder(own, "dataset") as tmp:
        (tmp / "train.parquet").write_text("rows")
    (own / "notes.txt").write_text("the user's")  # added after the stage wrote it
    target = {
        "own-kind-plus-user-file": own,
        "inside-input": src / "prepared",
        "user-folder": src,
        "other-kind": other,
        "the-input": src / "train.jsonl",
        "parent-of-input": tmp_path,
        "cwd": ".",
        "root": "/",
        "home": "~",
        "a-file": src / "train.jsonl",
    }[where]
    inputs = [str(src / "train.jsonl")] if where.endswith("input") else []
    inputs = [str(src)] if where == "inside-input" else inputs
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError, match=message), atomic_folder(target, "dataset", inputs):
        pytest.fail("the body must not run")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing lost, nothing left


def test_a_stage_replaces_its_own_earlier_artifact_and_an_empty_folder(tmp_path):
    from qlora_kfp.storage.manifest import atomic_folder, verify

    empty = tmp_path / "kfp-output"
    empty.mkdir()  # KFP pre-creates output folders
    for _ in range(2):  # the second run replaces the first one's artifact
        with atomic_folder(empty, "dataset") as tmp:
            (tmp / "train.parquet").write_text("rows")
    assert verify(empty, "dataset")["files"].keys() == {"train.parquet"}
