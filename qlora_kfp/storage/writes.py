"""Writes that fail in one line and clean up after themselves.

A write that fails for want of space or permission (disk full, quota, read-only file system,
access denied) becomes one :class:`OutputError` naming the output, whichever library did the
writing. Temporary folders are locked by their writer while it runs, so the ones that killed
writes left behind are told apart from a live writer's and removed by the next write of the
same output. An artifact's writer also holds its output's lock (:func:`output_lock`): a
second run writing the same output at the same time is refused, naming the first one's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qlora_kfp import env
from qlora_kfp.errors import OutputError

log = logging.getLogger(__name__)
# A partial folder younger than this may be one whose writer has not locked it yet (where no
# writer holds the output's lock: downloads into the cache).
STALE_AFTER_S = 60.0
# Outputs whose lock a parent process holds for this one (the train stage for its ranks).
HELD_ENV = "QLORA_KFP_WRITING"
_held: dict[str, int] = {}  # outputs this process holds the lock of, and how many times
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
    if code is None and any(t in str(exc) for t in _TORCH_WRITER) and _file_size_limited():
        code = errno.EFBIG
    if code == errno.EFBIG:
        return OutputError(
            f"{path}: a file grew past the largest this process may write (its file size "
            "limit, `ulimit -f`, or the file system's largest file); raise the limit or "
            "choose an output folder on another file system"
        )
    if code == errno.ENAMETOOLONG:
        return OutputError(f"{path}: a file name is too long for the file system; shorten it")
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


def _file_size_limited() -> bool:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY


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


def remove_stale_partials(final: str | os.PathLike, owner: bool = False) -> list[Path]:
    """Remove the temporary folders that killed writes of ``final`` left beside it.

    Only folders named as :func:`partial_folder` names them *for this output*, owned by this
    user and not locked: a writer holds an ``flock`` on its folder while it runs, which the
    kernel drops when the process dies (SIGKILL included), so a concurrent writer's folder is
    never touched. Where locks are not supported nothing is removed. A caller that holds the
    output's lock (``owner``: :func:`output_lock`) knows no other writer of it is between
    creating and locking its folder, so an unlocked one is a dead writer's whatever its age;
    otherwise only those older than :data:`STALE_AFTER_S` are.
    """
    final = Path(final)
    pattern, removed = _partial_name(final), []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not pattern.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        st = p.stat()
        young = time.time() - st.st_mtime < STALE_AFTER_S
        if st.st_uid != os.geteuid() or young and not owner:
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
def output_lock(final: str | os.PathLike) -> Iterator[bool]:
    """Hold ``final``'s lock (``.<name>.lock`` beside it, with this writer's pid) while a run
    writes it; yields whether it is held (False where the file system has no locks).

    The kernel drops the lock when its holder dies (SIGKILL included), so a killed run's lock
    never blocks the next one. Re-entrant: a process holding it, or one whose parent does
    (:data:`HELD_ENV`: the train stage's ranks), takes it again at once.

    Raises:
        OutputError: another live run holds it, naming its pid and host.
    """
    final = Path(final)
    key = str(final.resolve())
    if key in _held or key in env_paths():
        _held[key] = _held.get(key, 0) + 1
        try:
            yield True
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    lock = final.parent / f".{final.name}.lock"
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_file(final, lock)
    if fd is None:  # no locks on this file system: nothing to tell writers apart by
        yield False
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    saved = env.text(HELD_ENV) if env.present(HELD_ENV) else None
    os.environ[HELD_ENV] = os.pathsep.join([*env_paths(), key])
    _held[key] = 1
    try:
        yield True
    finally:
        del _held[key]
        if saved is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = saved
        with contextlib.suppress(OSError):
            lock.unlink()  # still held: a writer waiting on this file opens it again
        os.close(fd)


def _lock_file(final: Path, lock: Path) -> int | None:
    """An open descriptor of ``lock``, locked by this process (None: locks unsupported)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
            raise OutputError(
                f"{final}: another run is writing it ({who}); wait for it to finish, or "
                "choose another output folder",
                retryable=True,  # it may have finished by the retry
            ) from None
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
            return None
        try:  # its last holder may have removed the file between our open and our lock
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def env_paths() -> list[str]:
    return [p for p in env.text(HELD_ENV).split(os.pathsep) if p]


def holds_lock(final: str | os.PathLike) -> bool:
    """Whether this process (or its parent, for it) holds ``final``'s :func:`output_lock`."""
    key = str(Path(final).resolve())
    return key in _held or key in env_paths()


@contextlib.contextmanager
def partial_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A new temporary folder beside ``final``, locked for as long as this writer runs.

    Stale ones of earlier, killed writes of the same output are removed first: any unlocked
    one when this writer holds the output's lock (:func:`output_lock`), else only old ones.
    The caller moves the folder into place or removes it.
    """
    final = Path(final)
    for p in remove_stale_partials(final, owner=holds_lock(final)):
        log.info("removed %s, left by an interrupted write", p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no locks here (some FUSE mounts): no cleanup
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)
