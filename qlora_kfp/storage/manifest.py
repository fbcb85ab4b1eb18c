"""Atomic artifact folders with a checksum manifest.

A stage writes its artifact into a temporary sibling folder and renames it into place only
after ``MANIFEST.json`` (sha256 and size of every file) has been written last. A reader calls
:func:`verify` and gets a clear :class:`ArtifactError` for a missing manifest, a missing file
or a checksum mismatch, so a half-written artifact never passes for a complete one. Writes go
through :mod:`qlora_kfp.storage.writes`: a full disk or a read-only output is one
:class:`OutputError` naming the path, and the next write removes what killed ones left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from qlora_kfp.errors import ArtifactError
from qlora_kfp.storage.writes import output_lock, partial_folder, writing

MANIFEST = "MANIFEST.json"
# Largest weights file the model stages write. KFP's launcher uploads each output file as one
# S3 object in 5 MiB parts, at most 10,000 of them (52.4 GB): transformers' default shard of
# 50 GB is just under that ceiling; 5 GB shards stay far from it and upload in parallel.
SHARD_SIZE = "5GB"
# The stage that writes each kind: what to re-run when an artifact is damaged.
PRODUCERS = {
    "dataset": "prepare",
    "quantized-model": "quantize",
    "adapter": "train",
    "train-checkpoint": "train",
    "evaluation": "evaluate",
    "merged-model": "merge",
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weights (``*.safetensors``) under a folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def write_manifest(folder: str | os.PathLike, kind: str, extra: dict | None = None) -> dict:
    """Write ``MANIFEST.json`` listing every file under ``folder`` with size and sha256."""
    root = Path(folder)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"kind": kind, "files": files, **(extra or {})}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read a folder's manifest, or raise :class:`ArtifactError` when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{folder}: no {MANIFEST}; the artifact is incomplete (its writer did not finish)"
        )
    return json.loads(path.read_text())


def verify(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """Check every file of a folder against its manifest; return the manifest."""
    manifest = read_manifest(folder)
    if kind and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder}: is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    for rel, meta in manifest["files"].items():
        p = Path(folder) / rel
        if not p.is_file():
            raise ArtifactError(
                f"{folder}: file {rel} listed in {MANIFEST} is missing{_rerun(manifest)}"
            )
        if p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            raise ArtifactError(
                f"{folder}: file {rel} does not match its checksum in {MANIFEST} (truncated or "
                f"corrupt){_rerun(manifest)}"
            )
    return manifest


def _rerun(manifest: dict) -> str:
    stage = PRODUCERS.get(manifest.get("kind", ""))
    return f"; re-run the {stage} stage to write it again" if stage else ""


def check_output(
    final: str | os.PathLike, kind: str, inputs: Sequence[str | os.PathLike] = ()
) -> None:
    """Refuse an output path whose replacement would destroy something of the user's.

    A stage replaces its output folder as a whole, so the folder may only be absent, empty, or
    an earlier artifact of the same kind (recognised by its manifest). The root, the home
    folder, the working folder, and any input or a folder holding one are refused outright.

    Raises:
        ArtifactError: naming the path and what to use instead.
    """
    given = Path(final).expanduser()
    _check_path(final, Path(os.path.abspath(given)))
    if given.is_symlink():  # replacing it at the end would fail (or replace the link), work lost
        raise ArtifactError(
            f"{final}: is a symbolic link (to {os.readlink(given)}); give the folder it points "
            "to, or a new folder"
        )
    path = given.resolve()
    named = {Path("/"): "the root folder", Path.home().resolve(): "your home folder"}
    named[Path.cwd().resolve()] = "the working folder"
    if path in named:
        raise ArtifactError(f"{final}: refusing to write the {kind} over {named[path]}")
    for src in inputs:
        if not src or "://" in str(src):
            continue
        src_path = Path(src).expanduser().resolve()
        if path == src_path or path in src_path.parents:
            raise ArtifactError(
                f"{final}: refusing to write the {kind} there: it holds the input {src}; "
                "choose a new folder"
            )
        if src_path in path.parents:  # the input's own writer would replace it, output and all
            raise ArtifactError(
                f"{final}: refusing to write the {kind} inside the input {src}; "
                "choose a folder outside it"
            )
    if path.is_file() or path.is_symlink():
        raise ArtifactError(f"{final}: is a file, not an output folder; choose a new folder")
    if path.is_dir() and any(path.iterdir()):
        try:
            existing = read_manifest(path).get("kind")
        except (ArtifactError, ValueError):
            existing = None
        if existing != kind:
            what = f"a {existing!r} artifact" if existing else "files that are not an artifact"
            raise ArtifactError(
                f"{final}: holds {what}; a stage replaces only an earlier {kind!r} artifact. "
                "Choose a new or empty folder"
            )
        extra = foreign_files(path)
        if extra:
            raise ArtifactError(
                f"{final}: holds files its {kind!r} manifest does not list ({_few(extra)}); "
                "a stage replaces the folder whole: move them out or choose a new folder"
            )


# What an output's own name gets in the folders and files written beside it: the longest is
# its partial folder, ".<name>.partial-" and 8 random characters (storage/writes.py).
NAME_OVERHEAD = len("..partial-") + 8


def _check_path(final: str | os.PathLike, path: Path) -> None:
    """Refuse, before any work, an output that no write could make: one under a file, or
    with a name longer than the file system takes (with what its partial folder adds)."""
    existing = Path(path.anchor)  # the deepest folder of the path that exists
    for part in path.parts[1:]:
        try:
            os.stat(existing / part)
        except OSError:  # absent, too long a name, or under a file
            break
        existing = existing / part
    if not existing.is_dir() and existing != path:
        raise ArtifactError(
            f"{final}: {existing} is a file, not a folder, so nothing can be written under "
            "it; choose an output folder elsewhere"
        )
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.relative_to(existing).parts[:-1]:  # the folders a write would make
        if len(os.fsencode(part)) > limit:
            raise ArtifactError(
                f"{final}: the folder name {part[:20]!r}... is {len(os.fsencode(part))} bytes "
                f"long; this file system takes at most {limit}; choose a shorter name"
            )
    size = len(os.fsencode(path.name))  # its own name, even where the folder exists (KFP's)
    if size > limit - NAME_OVERHEAD:
        raise ArtifactError(
            f"{final}: its name is {size} bytes long; this file system takes at most "
            f"{limit - NAME_OVERHEAD} ({limit} a name, less {NAME_OVERHEAD} for the temporary "
            "folder written beside it); choose a shorter name"
        )


def foreign_files(folder: Path) -> list[str]:
    """Files under an artifact folder that its manifest does not list (someone else's)."""
    listed = set(read_manifest(folder).get("files", {})) | {MANIFEST}
    return sorted(
        rel
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink())
        and (rel := p.relative_to(folder).as_posix()) not in listed
    )


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@contextlib.contextmanager
def atomic_folder(
    final: str | os.PathLike, kind: str, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder; on success write the manifest and move it to ``final``.

    ``final`` is checked first (:func:`check_output`, against ``inputs`` too). On an exception
    the temporary folder is removed and ``final`` is left untouched; a full disk or a
    read-only output becomes one :class:`OutputError` naming ``final``, and so does another
    run writing ``final`` at the same time (:func:`~qlora_kfp.storage.writes.output_lock`).
    """
    check_output(final, kind, inputs)
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
    with writing(final), output_lock(final), partial_folder(final) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes 0700; artifacts are read by other users (KFP, MLflow)
        try:
            yield tmp
            write_manifest(tmp, kind)
            if final.exists():
                # KFP pre-creates output artifact folders; an empty or stale one is replaced.
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
