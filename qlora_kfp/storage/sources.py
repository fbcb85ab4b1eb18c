"""Where models and datasets come from: local paths, ``s3://`` URIs or hub ids.

The loaders are the real ones (``from_pretrained``, ``datasets.load_dataset``); this module
only turns an ``s3://`` URI into a local cached copy and turns the libraries' failures into
one clear :class:`SourceError` naming the source.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from qlora_kfp import env
from qlora_kfp.errors import ArtifactError, SourceError
from qlora_kfp.storage import s3
from qlora_kfp.storage.manifest import MANIFEST, PRODUCERS
from qlora_kfp.storage.writes import partial_folder, writing

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Folder for downloaded sources (``QLORA_KFP_CACHE``, default ``~/.cache/qlora-kfp``)."""
    return env.path("QLORA_KFP_CACHE")


def keep_days() -> float:
    """Days an unused older version of a cached source is kept (``QLORA_KFP_CACHE_KEEP_DAYS``)."""
    raw = env.text("QLORA_KFP_CACHE_KEEP_DAYS")
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if days < 0:
        raise SourceError(f"QLORA_KFP_CACHE_KEEP_DAYS={raw!r}: give a number of days, 0 or more")
    return days


def localize(source: str) -> str:
    """Return a local path for ``s3://`` sources (downloaded once per version), else ``source``.

    A cache entry is keyed by what S3 says about the objects (ETag, size, LastModified, and a
    single object's VersionId), not by the key alone: an object replaced under the same key
    is downloaded again, also on a cache shared by many pods. An entry is moved into place
    only once complete, so its existence is its completeness. Each use marks its entry used;
    a new version's download removes older versions unused for :func:`keep_days` (a dataset
    replaced daily for scheduled retraining would otherwise fill a shared cache).
    """
    if not s3.is_s3(source):
        return source
    bucket, key = s3.split_uri(source)
    for _ in range(3):
        objects = s3.list_objects(source)
        version = s3.version(objects)
        entry = cache_dir() / "s3" / bucket / key / f"@{version}"
        if not entry.is_dir():
            _download(source, objects, entry)
            if s3.version(s3.list_objects(source)) != version:  # replaced while downloading
                log.warning("%s changed while it was downloaded; downloading it again", source)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            _prune_versions(entry)
        with contextlib.suppress(OSError):  # a read-only or another user's cache: not marked
            os.utime(entry)
        return str(entry / Path(key).name)
    raise SourceError(
        f"{source}: changed three times while it was downloaded; run again once "
        "writes to it have finished"
    )


def _prune_versions(entry: Path) -> None:
    """Remove the other versions of ``entry``'s source that nobody used for keep_days().

    Each is first renamed out of the way (atomic), so no process sees a version half removed
    as a complete entry; a process that still reads one (a memory-mapped dataset) keeps its
    open files on a local disk.
    """
    days = keep_days()
    cutoff = time.time() - days * 86400
    for old in entry.parent.glob("@*"):
        try:
            if old == entry or not old.is_dir() or old.stat().st_mtime > cutoff:
                continue
            doomed = old.with_name(f".{old.name}.removing-{os.getpid()}")
            old.rename(doomed)
        except OSError:  # another process removed or renamed it first, or not ours
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("removed %s from the cache: an older version, unused for %g days", old, days)


def _download(source: str, objects: list[dict], entry: Path) -> None:
    """Download into a partial folder beside ``entry`` and move it into place whole."""
    with writing(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
    with writing(entry), partial_folder(entry) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes 0700; a shared cache is read by other users' pods
        try:
            name = Path(s3.split_uri(source)[1]).name
            s3.download_folder(
                source, tmp if s3.is_single(source, objects) else tmp / name, objects=objects
            )
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                shutil.rmtree(tmp)  # another process finished the same version first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def model_source(source: str) -> str:
    """Resolve a model source to what ``from_pretrained`` takes, or raise a clear error."""
    path = localize(source)
    if Path(path).exists():
        if not (Path(path) / "config.json").is_file():
            raise SourceError(f"{source}: no config.json; not a saved transformers model")
        check_weights(Path(path))
        return path
    if not is_hub_id(path):
        raise SourceError(f"{source}: no such file or folder, and not a hub id")
    return path  # a hub id: from_pretrained downloads it (unless HF_HUB_OFFLINE=1)


def check_weights(folder: Path) -> None:
    """Fail in one line on a missing shard or a truncated or corrupt safetensors file.

    Reads only the headers (a length and a JSON table of tensor offsets), so it costs nothing
    on a 140 GB model, and says what to do: re-run the stage that wrote an artifact, or
    download a base model again.

    Raises:
        ArtifactError: naming the file (not retried: the same bytes are there on a retry).
    """
    try:
        kind = json.loads((folder / MANIFEST).read_text()).get("kind", "")
    except (OSError, ValueError):
        kind = ""
    stage = PRODUCERS.get(kind)
    todo = f"re-run the {stage} stage" if stage else "download or copy the model again"
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            raise ArtifactError(f"{index}: corrupt shard index; {todo}") from None
        missing = sorted(shards - {f.name for f in files})
        if missing:
            raise ArtifactError(f"{folder / missing[0]}: missing (listed in {index.name}); {todo}")
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            raise ArtifactError(f"{f}: {problem}; {todo}")


def _safetensors_problem(f: Path) -> str:
    """What is wrong with a safetensors file's framing ("" when nothing): the format is an
    8-byte little-endian header length, the JSON header, then the tensors' bytes."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return f"truncated or corrupt safetensors file ({size} bytes; its header is cut off)"
        try:
            header = json.loads(fh.read(n))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "corrupt safetensors file (its header is not a tensor table)"
    if 8 + n + end > size:
        return f"truncated safetensors file ({size} bytes of {8 + n + end})"
    return ""


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """AutoTokenizer for a model source, with a pad token (EOS is never reused as pad)."""
    from transformers import AutoTokenizer

    src = model_source(source)
    check_model_code(source, src, trust_remote_code)
    check_tokenizer_files(Path(src))
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise SourceError(f"{source}: cannot load a tokenizer ({first_line(exc)})") from None
    if tok.pad_token is None:
        # Labels are built before padding and padded with -100 (DataCollatorForSeq2Seq), so
        # reusing UNK/EOS as the pad id never masks the real EOS out of the labels. Adding a
        # new token instead would index past the model's embedding matrix.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def check_model_code(source: str, path: str, trust_remote_code: bool) -> None:
    """Fail in one line, before loading, on a local model transformers cannot build: a
    ``model_type`` it does not know with no code of the model's own (``auto_map``), the
    model's own code without ``trust_remote_code``, or its ``.py`` files missing.

    transformers reports these as a ValueError traceback, or as an OSError naming a hub URL
    made of the local path.

    Raises:
        ConfigError: an unknown model_type, or trust_remote_code is needed and off.
        ArtifactError: a .py file that config.json's auto_map names is missing.
    """
    from qlora_kfp.errors import ConfigError

    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # a hub id, or a config.json from_pretrained reports itself
    if not isinstance(config, dict):
        return
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    where = folder / "config.json"
    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    known = model_type in CONFIG_MAPPING_NAMES
    if not auto_map:
        if model_type is not None and not known:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not one transformers {__version__} "
                "knows, and config.json names no code of the model's own (auto_map); upgrade "
                "transformers (pip install -U transformers), or fix model_type"
            )
        return
    modules = sorted({ref.split(".")[0] for ref in _auto_map_refs(auto_map) if "--" not in ref})
    if not trust_remote_code:
        if known:
            return  # transformers builds its own class for it and ignores the model's code
        raise ConfigError(
            f"{where}: model_type {model_type!r} is built by the model's own code ("
            + ", ".join(f"{m}.py" for m in modules)
            + "), which runs only with trust_remote_code=true; read that code, then set "
            "trust_remote_code=true, or use a model transformers supports"
        )
    missing = [m for m in modules if not (folder / f"{m}.py").is_file()]
    if missing:
        raise ArtifactError(
            f"{folder / (missing[0] + '.py')}: missing (config.json's auto_map names it for "
            f"the model's own code); copy the model's .py files with it ({source})"
        )


def _auto_map_refs(auto_map: dict) -> list[str]:
    """The ``module.Class`` references of an ``auto_map`` (a tokenizer's is a pair)."""
    refs = []
    for value in auto_map.values():
        for ref in value if isinstance(value, list | tuple) else [value]:
            if isinstance(ref, str) and "." in ref:
                refs.append(ref)
    return refs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(folder: Path) -> None:
    """Fail in one line on a cut-off or corrupt tokenizer file of a local model (which
    ``AutoTokenizer`` reports as a JSONDecodeError traceback from inside ``json``).

    Raises:
        ArtifactError: naming the file and the line where it breaks off.
    """
    for name in TOKENIZER_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            json.loads(f.read_bytes())
        except ValueError as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise ArtifactError(
                f"{f}: not valid JSON{where}, cut off or corrupt; download or copy the model again"
            ) from None


def first_line(exc: BaseException) -> str:
    """A library error's first line (its type's name when it says nothing), for a one-line
    message that does not quote the rest of a library's text."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
