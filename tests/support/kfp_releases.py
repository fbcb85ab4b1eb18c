"""Each supported KFP backend release's own protos, from PyPI, and parsing with them.

The Go backend cannot be built here: the Go module proxy refuses ``github.com/kubeflow/
pipelines`` at every version (HTTP 403, also at the release commits' pseudo-versions), and
so the compiler, API server, driver and launcher with it. What each release parses is fixed by
its protos, which KFP publishes to PyPI per release as ``kfp-pipeline-spec`` and
``kfp-kubernetes`` (generated from the same ``.proto`` files as the Go code of that tag).
``make kfp-releases`` (a step of ``make test``) downloads them into ``.cache/kfp-releases``;
``python tests/support/kfp_releases.py`` does the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "kfp-releases"
# Backend releases and the PyPI version of their protos. 2.14.6 is the last 2.14 patch on PyPI
# (the 2.14.4 tag of kubeflow/pipelines carries __version__ 2.14.6).
RELEASES = ("2.14.0", "2.14.6", "2.15.0", "2.16.0", "2.17.0")
FILES = {
    "kfp-pipeline-spec": "kfp/pipeline_spec/pipeline_spec_pb2.py",
    "kfp-kubernetes": "kfp/kubernetes/kubernetes_executor_config_pb2.py",
}


def release_dir(release: str) -> Path:
    """Where ``release``'s protos are unpacked (``kfp/...``), complete or not."""
    return CACHE / release


def is_ready(release: str) -> bool:
    return all((release_dir(release) / member).is_file() for member in FILES.values())


def download(release: str) -> Path:
    """Fetch ``release``'s two wheels from PyPI and unpack only their generated protos."""
    dest = release_dir(release)
    if is_ready(release):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        pins = [f"{name}=={release}" for name in FILES]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *pins],
            check=True,
        )
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for member in FILES.values():
                    if member in z.namelist():
                        target = dest / member
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(member))
    for package in ("kfp", "kfp/pipeline_spec", "kfp/kubernetes"):
        (dest / package / "__init__.py").touch()
    if not is_ready(release):
        raise RuntimeError(f"{release}: the wheels lack {sorted(FILES.values())}")
    return dest


def parse(release: str, pipelines: list[Path]) -> dict[str, list[str]]:
    """What ``release``'s API server and compiler answer for each compiled pipeline.

    Returns:
        ``{path: [errors]}``; an empty list means the release accepts the run.
    """
    if not is_ready(release):
        raise FileNotFoundError(
            f"KFP {release}'s protos are not in {CACHE}: run `make kfp-releases`"
        )
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("kfp_release_check.py")),
            str(release_dir(release)),
            *map(str, pipelines),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


if __name__ == "__main__":
    for r in RELEASES:
        print(f"KFP {r}: {download(r)}")
