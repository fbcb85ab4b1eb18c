"""Where models and datasets come from: local paths, ``s3://`` URIs or hub ids.

The loaders are the real ones (``from_pretrained``, ``datasets.load_dataset``); this module
only turns an ``s3://`` URI into a local cached copy and turns the libraries' failures into
one clear :class:`SourceError` naming the source.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qlora_kfp.errors import SourceError
from qlora_kfp.storage import s3

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Folder for downloaded sources (``QLORA_KFP_CACHE``, default ``~/.cache/qlora-kfp``)."""
    return Path(os.environ.get("QLORA_KFP_CACHE", Path.home() / ".cache" / "qlora-kfp"))


def localize(source: str) -> str:
    """Return a local path for ``s3://`` sources (downloaded once), else ``source`` itself."""
    if s3.is_s3(source):
        bucket, key = s3.split_uri(source)
        dest = cache_dir() / "s3" / bucket / key
        done = dest.with_name(dest.name + ".complete")
        if not done.exists():
            got = s3.download_folder(source, dest)
            done.write_text(str(got))
        return done.read_text()
    return source


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def model_source(source: str) -> str:
    """Resolve a model source to what ``from_pretrained`` takes, or raise a clear error."""
    path = localize(source)
    if Path(path).exists():
        if not (Path(path) / "config.json").is_file():
            raise SourceError(f"{source}: no config.json; not a saved transformers model")
        return path
    if not is_hub_id(path):
        raise SourceError(f"{source}: no such file or folder, and not a hub id")
    return path  # a hub id: from_pretrained downloads it (unless HF_HUB_OFFLINE=1)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """AutoTokenizer for a model source, with a pad token (EOS is never reused as pad)."""
    from transformers import AutoTokenizer

    src = model_source(source)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise SourceError(f"{source}: cannot load a tokenizer ({_first_line(exc)})") from None
    if tok.pad_token is None:
        # Labels are built before padding and padded with -100 (DataCollatorForSeq2Seq), so
        # reusing UNK/EOS as the pad id never masks the real EOS out of the labels. Adding a
        # new token instead would index past the model's embedding matrix.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
