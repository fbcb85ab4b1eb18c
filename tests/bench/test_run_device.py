"""bench/run_device.sh: every benchmark call starts with every GPU test the project has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_device_script_runs_every_file_with_gpu_tests():
    script = (ROOT / "bench" / "run_device.sh").read_text()
    listed = set(re.findall(r"tests/[\w/]+\.py", script))
    marked = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b", p.read_text())
    }
    assert marked, "no gpu-marked test found: the pattern no longer matches"
    assert marked <= listed, f"not run on the GPU machine: {sorted(marked - listed)}"
