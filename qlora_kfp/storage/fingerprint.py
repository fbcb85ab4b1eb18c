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

from qlora_kfp import env
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
    return s3.version(s3.list_objects(uri, missing_ok=True))  # missing: prepare says so


def artifact_digest(folder: str | os.PathLike) -> str:
    """Digest of an artifact's content from its manifest (every file's sha256): no reread."""
    from qlora_kfp.storage.manifest import read_manifest

    files = read_manifest(folder)["files"]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}:{files[rel]['sha256']};".encode())
    return h.hexdigest()[:16]


SAMPLE_BYTES = 1 << 20


def model_fingerprint(source: str) -> str:
    """Content digest of a model's weights that is cheap and the same for any copy of them.

    Every tensor's name, shape and first, middle and last rows (as bfloat16), read through the
    safetensors headers: tens of MiB of a 70B model, not its 140 GB. Sharding and float32 or
    bfloat16 storage do not change it; other weights of the same shapes do. A hub id not in
    the local hub cache gives its id and the hub's current commit (:func:`hub_revision`).
    """
    path = Path(sources.localize(source))
    if not path.is_dir():
        path = _hub_snapshot(source)
        if path is None:
            return hub_revision(source)
    files = sorted(path.glob("*.safetensors"))
    if not files:  # e.g. pytorch_model.bin: sampled bytes of each weights file
        h = hashlib.sha256()
        for f in sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")):
            h.update(f"{f.name}:{_sampled(f)};".encode())
        return "bytes:" + h.hexdigest()[:16]
    tensors = {}
    for f in files:
        tensors.update(_tensor_digests(f))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}:{tensors[name]};".encode())
    return "weights:" + h.hexdigest()[:16]


def _tensor_digests(file: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="pt") as st:
        for name in st.keys():  # noqa: SIM118 - safe_open is no dict
            sl = st.get_slice(name)
            shape = sl.get_shape()
            if len(shape) == 0 or shape[0] <= 3:
                t = st.get_tensor(name)
            else:
                t = torch.cat([sl[i : i + 1] for i in (0, shape[0] // 2, shape[0] - 1)])
            if t.is_floating_point():
                t = t.to(torch.bfloat16).view(torch.int16)
            data = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
            out[name] = f"{list(shape)}:{hashlib.sha256(data).hexdigest()}"
    return out


def _sampled(f: Path) -> str:
    size, h = f.stat().st_size, hashlib.sha256()
    with open(f, "rb") as fh:
        for offset in sorted(
            {0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}
        ):
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()}"


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local hub cache's copy of a hub model, without any network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached or not a hub id: no content to read
        return None


def hub_revision(repo_id: str, kind: str = "model") -> str:
    """``hub:<id>@<commit>``: the hub's current commit of a model or dataset repo, so a new
    revision pushed under the same id misses KFP's cache. ``hub:<id>`` when the hub cannot
    say (offline mode, no network, no such repo): the stage that downloads it then fails
    with its own message."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.model_info(repo_id) if kind == "model" else api.dataset_info(repo_id)
        return f"hub:{repo_id}@{info.sha}" if info.sha else f"hub:{repo_id}"
    except Exception:  # noqa: BLE001 - offline or unreachable: the id is all there is
        return f"hub:{repo_id}"


def source_digest(source: str, kind: str = "dataset") -> str:
    """Content digest of a path, an ``s3://`` URI, or a hub id of ``kind`` (``model`` or
    ``dataset``: its current commit)."""
    if s3.is_s3(source):
        return "s3:" + _s3(source)
    if Path(source).exists():
        return "file:" + _local(Path(source))[:16]
    if sources.is_hub_id(source):
        return hub_revision(source, kind)
    return "missing:" + source


def code_version() -> str:
    """What runs: the package version, the image's git commit and the image reference; from a
    checkout with uncommitted edits to the code, a digest of them too (the retraining gate
    and the cache keys must not take edited code for the commit's)."""
    from importlib.metadata import PackageNotFoundError, version

    from qlora_kfp.version import git_commit, uncommitted_changes

    try:
        pkg = version("qlora-kfp")
    except PackageNotFoundError:
        pkg = "source"
    edits = uncommitted_changes()
    commit = git_commit()[:12] + (f"-edited.{edits}" if edits else "")
    return f"{pkg}+{commit}+{env.text('QLORA_KFP_IMAGE')}"


def fingerprint(data_source: str, base_model: str) -> str:
    """One string that changes when the data, the model or the code changes."""
    parts = {
        "data": source_digest(data_source),
        "model": source_digest(base_model, kind="model"),
        "code": code_version(),
    }
    return json.dumps(parts, sort_keys=True)
