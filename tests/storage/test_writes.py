"""Failed writes end in one line naming the output; killed writes leave nothing behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from qlora_kfp.errors import OutputError
from qlora_kfp.storage import writes
from qlora_kfp.storage.manifest import atomic_folder, verify

# What the real writers raise, as measured on a full 64 KiB tmpfs and a read-only mount (see
# test_real_full_and_read_only_disks): Python's own writes an OSError with the errno and no
# file name; safetensors' Rust writer (safetensors/bindings/python/src/lib.rs) a
# SafetensorError carrying the io::Error only in its text; torch.save's zip writer
# (caffe2/serialize/inline_container.cc) a RuntimeError with neither.
ENOSPC_PY = OSError(errno.ENOSPC, "No space left on device")
ENOSPC_ST = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)
ENOSPC_TORCH = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _raise(exc):
    def write(*a, **kw):
        raise exc

    return write


@pytest.mark.parametrize(
    "where,exc,free,message",
    [
        ("body", ENOSPC_PY, None, "disk full while writing it"),
        ("body", OSError(errno.EDQUOT, "Disk quota exceeded"), None, "quota exceeded"),
        ("body", ENOSPC_ST, None, "disk full while writing it"),
        ("body", ENOSPC_TORCH, 4096, "disk full while writing it"),
        ("mkdir", OSError(errno.EROFS, "Read-only file system", "OUT"), None, "read-only"),
        ("mkdtemp", PermissionError(errno.EACCES, "Permission denied", "OUT"), None, "denied"),
    ],
    ids=[
        "python-write-enospc",
        "quota",
        "safetensors-enospc",
        "torch-save-full-disk",
        "read-only-output",
        "output-not-writable",
    ],
)
def test_a_failed_write_is_one_line_naming_the_output(
    tmp_path, monkeypatch, where, exc, free, message
):
    final = tmp_path / "out" / "adapter"
    if isinstance(exc, OSError) and exc.filename == "OUT":
        exc = type(exc)(exc.errno, exc.strerror, str(final.parent))
    if free is not None:
        usage = SimpleNamespace(total=10**9, used=10**9 - free, free=free)
        monkeypatch.setattr(writes.shutil, "disk_usage", lambda p: usage)
    if where == "mkdir":
        monkeypatch.setattr(Path, "mkdir", _raise(exc))
    if where == "mkdtemp":
        monkeypatch.setattr(writes.tempfile, "mkdtemp", _raise(exc))
    with pytest.raises(OutputError) as got, atomic_folder(final, "adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        raise exc
    text = str(got.value)
    assert text.startswith(f"{final}: ") and message in text and "\n" not in text
    # A KFP retry may find room on a full disk, never on a read-only or denied output.
    assert got.value.retryable == (message in ("disk full while writing it", "quota exceeded"))
    assert not final.exists()
    leftovers = list(final.parent.iterdir()) if final.parent.exists() else []
    assert leftovers == [], "a failed write leaves no partial folder"


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"),
        ENOSPC_TORCH,  # a torch writer error with plenty of free space is not a full disk
        ValueError("a bug"),
    ],
    ids=["denied-input-elsewhere", "torch-writer-error-with-space", "not-a-write-error"],
)
def test_other_errors_pass_through_unchanged(tmp_path, exc):
    with pytest.raises(type(exc)) as got, atomic_folder(tmp_path / "art", "test"):
        raise exc
    assert got.value is exc
    assert list(tmp_path.iterdir()) == []


def _mount(where: Path, *opts: str) -> bool:
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *opts)), "tmpfs", str(where)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "writer",
    [
        lambda d: (d / "a.bin").write_bytes(b"x" * 2**20),
        lambda d: save_file({"w": torch.zeros(2**18)}, d / "w.safetensors"),
        lambda d: torch.save({"w": torch.zeros(2**18)}, d / "optimizer.pt"),
    ],
    ids=["python", "safetensors", "torch-save"],
)
@pytest.mark.parametrize("fs", ["full", "read-only"])
def test_real_full_and_read_only_disks(tmp_path, writer, fs):
    """The doubles above against the real thing: a 64 KiB tmpfs, or a read-only one."""
    disk = tmp_path / "disk"
    if not _mount(disk, *(["ro"] if fs == "read-only" else [])):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    message = "disk full" if fs == "full" else "read-only"
    try:
        with pytest.raises(OutputError, match=message), atomic_folder(disk / "art", "x") as tmp:
            writer(tmp)
        assert list(disk.iterdir()) == [], "nothing is left to keep the disk full"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


WRITER = """
import sys, time
from qlora_kfp.storage.manifest import atomic_folder
with atomic_folder(sys.argv[1], "adapter") as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(final)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # preemption: no cleanup runs
    proc.wait()


def test_the_next_write_removes_partials_of_killed_writes_only(tmp_path):
    """Told apart by whether their writer is alive (its lock), not by age: the next run
    seconds after a preempted one removes its partial folder."""
    final = tmp_path / "adapter"
    killed = _writer(final)
    _kill(killed)
    (stale,) = tmp_path.glob(".adapter.partial-*")
    keep = [
        tmp_path / ".adapter.partial-mine",  # not a name the project makes
        tmp_path / ".other.partial-abcdefgh",  # another output's
    ]
    for p in keep:
        p.mkdir()
    with atomic_folder(final, "adapter") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"y")
    assert not stale.exists(), "the killed write's partial folder is removed"
    assert all(p.is_dir() for p in keep)
    verify(final, "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter", *(p.name for p in keep)]
    ), "no lock file is left beside the output"


@pytest.mark.parametrize(
    "second",
    [
        lambda final: atomic_folder(final, "adapter").__enter__(),
        lambda final: writes.output_lock(final).__enter__(),
    ],
    ids=["artifact-write", "stage-lock"],
)
def test_a_second_run_writing_the_same_output_is_refused(tmp_path, second):
    """Two runs into one output never interleave: the second stops, naming the first."""
    final = tmp_path / "adapter"
    live = _writer(final)
    try:
        (live_tmp,) = tmp_path.glob(".adapter.partial-*")
        with pytest.raises(OutputError) as got:
            second(final)
        text = str(got.value)
        assert text.startswith(f"{final}: another run is writing it (pid {live.pid} on ")
        assert "choose another output folder" in text and "\n" not in text
        assert got.value.retryable, "the first may be done by a KFP retry"
        assert live_tmp.is_dir(), "a live writer's folder is never touched"
        assert not final.exists()
    finally:
        _kill(live)
    with atomic_folder(final, "adapter") as tmp:  # the lock went with its writer
        (tmp / "adapter_model.safetensors").write_bytes(b"y")
    assert not live_tmp.exists()


def test_the_lock_is_taken_again_by_its_holder_and_its_ranks(tmp_path, monkeypatch):
    """The train stage holds it for the whole run; its own write (or a rank's) goes on."""
    final = tmp_path / "adapter"
    with writes.output_lock(final) as held:
        assert held and writes.holds_lock(final)
        with atomic_folder(final, "adapter") as tmp:
            (tmp / "a").write_text("x")
        code = (
            "import sys; from qlora_kfp.storage.manifest import atomic_folder\n"
            "with atomic_folder(sys.argv[1], 'adapter') as tmp: (tmp / 'a').write_text('y')\n"
        )
        subprocess.run([sys.executable, "-c", code, str(final)], check=True)
    assert not writes.holds_lock(final) and writes.HELD_ENV not in os.environ
    assert (final / "a").read_text() == "y"


def test_a_young_unlocked_partial_is_left_alone(tmp_path):
    """Without the output's lock (a download into the cache) it may belong to a writer
    between creating and locking it."""
    young = tmp_path / ".adapter.partial-abcd1234"
    young.mkdir()
    assert writes.remove_stale_partials(tmp_path / "adapter") == []
    old = os.path.getmtime(young) - 2 * writes.STALE_AFTER_S
    os.utime(young, (old, old))
    assert writes.remove_stale_partials(tmp_path / "adapter") == [young]


FSIZE_WRITER = """
import resource, sys, torch
from safetensors.torch import save_file
from qlora_kfp.errors import OutputError
from qlora_kfp.storage.manifest import atomic_folder
writers = {
    "python": lambda d: (d / "a.bin").write_bytes(b"x" * 2**20),
    "safetensors": lambda d: save_file({"w": torch.zeros(2**18)}, d / "w.safetensors"),
    "torch-save": lambda d: torch.save({"w": torch.zeros(2**18)}, d / "optimizer.pt"),
}
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))  # `ulimit -f 64`
try:
    with atomic_folder(sys.argv[1], "x") as tmp:
        writers[sys.argv[2]](tmp)
except OutputError as exc:
    sys.exit(f"OutputError: {exc}")
"""


@pytest.mark.parametrize("writer", ["python", "safetensors", "torch-save"])
def test_a_file_size_limit_is_one_line(tmp_path, writer):
    """RLIMIT_FSIZE (``ulimit -f``, a container's limit): Python ignores SIGXFSZ, so the write
    fails with EFBIG, which was a traceback from inside the writer."""
    final = tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_WRITER, str(final), writer], capture_output=True, text=True
    )
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.splitlines() == [err], err[-2000:]
    assert err.startswith(f"OutputError: {final}: a file grew past the largest this process")
    assert "ulimit -f" in err
    assert list(tmp_path.iterdir()) == [], "the failed write leaves nothing"
