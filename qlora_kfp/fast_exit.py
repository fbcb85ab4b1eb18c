"""A finished KFP task process exits without tearing its modules down.

Once KFP's executor has written a task's outputs, the process has nothing left to do, yet
Python then finalizes every module it imported: torch, transformers, peft, bitsandbytes and
MLflow take 1.9 s of it on 2 cores (0.6 s for MLflow alone), 15 s of a 72 s local run of the
demo's eleven tasks (each task's ``Wrote executor output file`` log line to kfp.local's
``finished``). :func:`ends_fast` has such a process, after a task that returned, run the
``atexit`` handlers (MLflow's, logging's flushes) as usual and then leave at once
(``os._exit``).

Only in a process that KFP's executor runs (``python -m kfp.dsl.executor_main``): never in a
test process or a CLI calling the same function. Only after the task returned: a task that
fails exits through ``sys.exit`` or a traceback as before, and an exception still raised after
it (writing the outputs) exits 1, as Python would. The ``qlora-kfp`` command does the same
with its own exit status (:func:`qlora_kfp.app.cli.entry`), and so do a train stage's rank
processes, their torchrun agent and the benchmark scripts.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from collections.abc import Callable

EXECUTOR = "kfp.dsl.executor_main"


def in_kfp_executor() -> bool:
    """Whether this process is KFP's executor running a component (local runner or pod)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == EXECUTOR


def _leave(status: int | None) -> None:
    atexit.unregister(_leave)
    atexit._run_exitfuncs()  # every other handler, last registered first, as at a normal exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing to write
            stream.flush()
    if status is None:  # PyErr_Print sets sys.last_value for an exception that ended Python
        status = 1 if getattr(sys, "last_value", None) is not None else 0
    os._exit(status)


def at_exit_leave(status: int | None = None) -> None:
    """When this process exits (after its non-daemon threads and its other ``atexit``
    handlers), leave with ``status`` without finalizing its modules. ``None``: 1 if an
    uncaught exception ends the program, else 0."""
    atexit.unregister(_leave)  # once, however often asked
    atexit.register(_leave, status)


def ends_fast(task: Callable) -> Callable:
    """Decorate a task function: once it returns inside KFP's executor, the process ends
    without finalizing its modules (see the module docstring)."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        out = task(*args, **kwargs)
        if in_kfp_executor():
            at_exit_leave()
        return out

    return run
