"""Cache keys that cannot go stale.

KFP caches a task by its inputs. ``data_source=s3://bucket/train.jsonl`` is the same string
after the file was replaced, and an image rebuilt under the same tag is the same image string,
so both would hit an old cache entry. The (never cached) fingerprint task hashes what the
sources hold and which code runs, and passes that to the cached tasks as an input.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qlora_kfp.storage import s3, sources


def _local(path: Path) -> str:
    from qlora_kfp.storage.manifest import sha256_file

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:".encode())
        st = f.stat()
        # Weights are large and written once: size + mtime catch a replacement without
        # reading gigabytes on every run; small files (data, configs) are hashed.
        h.update(
            (
                f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > 64 * 2**20 else sha256_file(f)
            ).encode()
        )
    return h.hexdigest()


def _s3(uri: str) -> str:
    """ETags, sizes and dates of every object under the URI (no download); the same listing
    keys the local download cache (sources.localize), so the two never disagree."""
    return s3.version(s3.list_objects(uri))


def artifact_digest(folder: str | os.PathLike) -> str:
    """Digest of an artifact's content from its manifest (every file's sha256): no reread."""
    from qlora_kfp.storage.manifest import read_manifest

    files = read_manifest(folder)["files"]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}:{files[rel]['sha256']};".encode())
    return h.hexdigest()[:16]


def source_digest(source: str) -> str:
    """Content digest of a path, an ``s3://`` URI, or a hub id (its id: no network here)."""
    if s3.is_s3(source):
        return "s3:" + _s3(source)
    if Path(source).exists():
        return "file:" + _local(Path(source))[:16]
    if sources.is_hub_id(source):
        return "hub:" + source
    return "missing:" + source


def code_version() -> str:
    """What runs: the package version, the image's git commit and the image reference."""
    from importlib.metadata import PackageNotFoundError, version

    from qlora_kfp.version import git_commit

    try:
        pkg = version("qlora-kfp")
    except PackageNotFoundError:
        pkg = "source"
    return f"{pkg}+{git_commit()[:12]}+{os.environ.get('QLORA_KFP_IMAGE', '')}"


def fingerprint(data_source: str, base_model: str) -> str:
    """One string that changes when the data, the model or the code changes."""
    parts = {
        "data": source_digest(data_source),
        "model": source_digest(base_model),
        "code": code_version(),
    }
    return json.dumps(parts, sort_keys=True)
