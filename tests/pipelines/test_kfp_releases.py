"""Each KFP backend release parses the compiled pipelines with its own protos.

The protos are each release's own (``tests/support/kfp_releases.py``: the PyPI wheels generated from
the ``.proto`` files of that tag), parsed the way its API server and compiler do
(``tests/support/kfp_release_check.py``). The releases ``make upload`` accepts must accept every
compiled variant; the ones it refuses must really refuse them, so the floor is exactly right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.kfp_releases import RELEASES, parse

from qlora_kfp.app.kfp_api import MIN_BACKEND, check_version, parse_version
from qlora_kfp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMPILED = sorted((ROOT / "pipelines" / "compiled").glob("*.yaml"))
# Compile-time options that change the Kubernetes config (pipelines/platform.py).
VARIANTS = {
    "cache-pvc": {"QLORA_KFP_CACHE_PVC": "model-cache"},
    "no-scratch-2-gpus": {"QLORA_KFP_SCRATCH_SIZE": "", "QLORA_KFP_GPUS": "2"},
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[Path]:
    """The committed YAML plus each compile-time variant, compiled here."""
    from qlora_kfp.app.compile import compile_all

    paths = list(COMPILED)
    for name, env in VARIANTS.items():
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            paths += map(Path, compile_all(tmp_path_factory.mktemp(name)))
    return paths


def supported(release: str) -> bool:
    return parse_version(release) >= MIN_BACKEND


@pytest.mark.parametrize("release", RELEASES)
def test_release_parses_what_upload_lets_through(release, variants):
    errors = {p: e for p, e in parse(release, variants).items() if e}
    if supported(release):
        assert not errors, f"KFP {release} refuses runs that `make upload` allows: {errors}"
        check_version(release, "kfp")  # and the commands let it through
    else:
        assert errors, f"KFP {release} accepts every variant: lower MIN_BACKEND"
        with pytest.raises(ConfigError, match="older than"):
            check_version(release, "kfp")


def test_the_release_table_brackets_the_floor():
    """Both sides of MIN_BACKEND are tested with real protos."""
    assert any(not supported(r) for r in RELEASES)
    assert any(parse_version(r) == MIN_BACKEND for r in RELEASES)
