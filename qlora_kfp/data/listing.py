"""Which files of a dataset folder are data: every file is either read or skipped for a reason.

A folder a user points at often holds more than data: a README, the hub's ``dataset_infos.json``,
``.gitattributes``, a ``.git/`` folder, macOS ``.DS_Store`` and ``._name`` resource forks. Hidden
names are never read; every other file is read when its extension is a data format and skipped
otherwise, and each skipped file is named with its reason (logged and kept in ``stats.json``), so
no data file is ever left out silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kfp.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# JSON files the hub and `datasets.save_to_disk` write beside the data: they describe it.
METADATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}


@dataclass
class Listing:
    """The files of a source: those to read (in order) and those skipped, with the reason."""

    root: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def name(self, path: Path) -> str:
        """``path`` relative to the listed folder (the file's own name for a single file)."""
        return path.name if self.root == path else path.relative_to(self.root).as_posix()


def skip_reason(path: Path, data_format: str) -> str:
    """Why a file found in a folder is not read ("" when it is read)."""
    name = path.name
    if name.startswith("."):
        return "hidden"
    if name.lower() in METADATA:
        return "dataset metadata"
    if not path.is_file():
        return "not a regular file"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        return f"not a data file ({path.suffix or 'no extension'})"
    if data_format != "auto" and fmt != data_format:
        return f"a {fmt} file, but data_format={data_format}"
    return ""


def list_files(path: Path, data_format: str) -> Listing:
    """List a file or a folder (recursively, hidden folders not entered).

    A single file is always read (with ``data_format``, or as its extension says), hidden or
    not: the user named it.

    Raises:
        DataError: when a folder holds no data file; the message names what was skipped (not
            a SourceError: the folder is there, and a retry would find the same files).
    """
    if path.is_file():
        return Listing(path, [path])
    listing = Listing(path)
    for top, dirs, names in os.walk(path):
        here = Path(top)
        for d in sorted(dirs):
            if d.startswith("."):
                listing.skipped.append({"file": listing.name(here / d) + "/", "reason": "hidden"})
            elif (here / d).is_symlink():  # os.walk does not enter it; say so
                listing.skipped.append(
                    {"file": listing.name(here / d) + "/", "reason": "link to a folder"}
                )
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for n in sorted(names):
            reason = skip_reason(here / n, data_format)
            if reason:
                listing.skipped.append({"file": listing.name(here / n), "reason": reason})
            else:
                listing.files.append(here / n)
    listing.files.sort(key=listing.name)
    listing.skipped.sort(key=lambda s: s["file"])
    for s in listing.skipped:
        log.warning("%s: skipped %s (%s)", path, s["file"], s["reason"])
    if not listing.files:
        shown = "; ".join(f"{s['file']} ({s['reason']})" for s in listing.skipped[:5])
        more = f" and {len(listing.skipped) - 5} more" if len(listing.skipped) > 5 else ""
        raise DataError(
            f"folder holds no data file to read (data files end in "
            f"{', '.join(sorted(FORMATS))}); skipped: {shown or 'nothing, it is empty'}{more}",
            source=str(path),
        )
    return listing
