"""Which code runs: the pipeline version and the git commit (from the image or the checkout)."""

from __future__ import annotations

import os
import subprocess

PIPELINE_VERSION = "0.1.0"


def git_commit() -> str:
    """The project's git commit: from the image (``QLORA_KFP_GIT_COMMIT``) or the checkout."""
    if os.environ.get("QLORA_KFP_GIT_COMMIT"):
        return os.environ["QLORA_KFP_GIT_COMMIT"]
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
