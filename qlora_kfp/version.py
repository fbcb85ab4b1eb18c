"""Which code runs: the pipeline version and the git commit (from the image or the checkout)."""

from __future__ import annotations

import os
import subprocess

from qlora_kfp import env

PIPELINE_VERSION = "0.1.0"


def git_commit() -> str:
    """The project's git commit: from the image (``QLORA_KFP_GIT_COMMIT``) or the checkout."""
    if env.text("QLORA_KFP_GIT_COMMIT"):
        return env.text("QLORA_KFP_GIT_COMMIT")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - installed from a wheel, no git: not an error
        return "unknown"


# The code a task runs from a checkout (components/ and pipelines/ are installed inside
# qlora_kfp): uncommitted edits there change what trains under the same commit.
CODE_PATHS = (":/qlora_kfp", ":/components", ":/pipelines")


def uncommitted_changes(where: str | None = None) -> str:
    """A short digest of the checkout's uncommitted edits to the code ("" when there are none,
    and in an image, whose ``QLORA_KFP_GIT_COMMIT`` names the code exactly)."""
    import hashlib

    if env.text("QLORA_KFP_GIT_COMMIT"):
        return ""
    here = where or os.path.dirname(os.path.abspath(__file__))
    try:
        diff = subprocess.run(
            ["git", "-C", here, "diff", "HEAD", "--", *CODE_PATHS],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout
    except Exception:  # noqa: BLE001 - no git, no checkout: nothing to add
        return ""
    return hashlib.sha256(diff).hexdigest()[:12] if diff else ""
