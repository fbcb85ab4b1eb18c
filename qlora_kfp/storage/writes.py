"""Writes that fail in one line and clean up after themselves.

A write that fails for want of space or permission (disk full, quota, read-only file system,
access denied) becomes one :class:`OutputError` naming the output, whichever library did the
writing. Temporary folders are locked by their writer while it runs, so the ones that killed
writes left behind are told apart from a live writer's and removed by the next write of the
same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qlora_kfp.errors import OutputError

log = logging.getLogger(__name__)
# A partial folder younger than this may be one whose writer has not locked it yet.
STALE_AFTER_S = 60.0
# safetensors' Rust writer reports an io::Error only in its message: "... (os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer (caffe2/serialize/inline_container.cc) reports a short write on a
# full disk as "[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534", with
# no errno; only the free space tells it apart.
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter")
LOW_SPACE_BYTES = 16 * 2**20


def write_error(exc: BaseException, path: str | os.PathLike) -> OutputError | None:
    """The one-line error for a write under ``path`` that failed for want of space or
    permission (disk full, quota, read-only file system, access denied), else ``None``."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        m = _OS_ERROR.search(str(exc))
        code = int(m.group(1)) if m else None
    if code is None and any(t in str(exc) for t in _TORCH_WRITER):
        code = errno.ENOSPC if _free_bytes(path) < LOW_SPACE_BYTES else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"{path}: disk full while writing it (no space left on the device or quota "
            "exceeded); free space there or choose another output folder",
            retryable=True,  # the failed write's files are gone: a retry may have room
        )
    if code == errno.EROFS:
        return OutputError(
            f"{path}: cannot write there, the file system is read-only; choose "
            "a writable output folder"
        )
    if code in (errno.EACCES, errno.EPERM) and _is_under(getattr(exc, "filename", None), path):
        return OutputError(
            f"{path}: permission denied writing there; choose a folder you may write to"
        )
    return None


def _is_under(filename: object, path: str | os.PathLike) -> bool:
    """Whether a failed file is the output's (a denied *input* is not an output error)."""
    if filename is None:
        return True
    parent = Path(path).resolve().parent
    return Path(str(filename)).resolve().is_relative_to(parent)


def _free_bytes(path: str | os.PathLike) -> float:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return float("inf")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write under ``path`` into :func:`write_error`'s one-line error."""
    try:
        yield
    except Exception as exc:
        err = write_error(exc, path)
        if err is None:
            raise
        raise err from None


def _partial_name(final: Path) -> re.Pattern:
    # tempfile.mkdtemp's random part: 8 characters of tempfile._RandomNameSequence.characters.
    return re.compile(re.escape(f".{final.name}.partial-") + r"[a-z0-9_]{8}")


def remove_stale_partials(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that killed writes of ``final`` left beside it.

    Only folders named as :func:`partial_folder` names them *for this output*, owned by this
    user, older than :data:`STALE_AFTER_S` and not locked: a writer holds an ``flock`` on its
    folder while it runs, which the kernel drops when the process dies (SIGKILL included), so
    a concurrent writer's folder is never touched. Where locks are not supported nothing is
    removed.
    """
    final = Path(final)
    pattern, removed = _partial_name(final), []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not pattern.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        st = p.stat()
        if st.st_uid != os.geteuid() or time.time() - st.st_mtime < STALE_AFTER_S:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer, or locks unsupported: cannot tell
            continue
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def partial_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A new temporary folder beside ``final``, locked for as long as this writer runs.

    Stale ones of earlier, killed writes of the same output are removed first. The caller
    moves the folder into place or removes it.
    """
    final = Path(final)
    for p in remove_stale_partials(final):
        log.info("removed %s, left by an interrupted write", p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no locks here (some FUSE mounts): no cleanup
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)
