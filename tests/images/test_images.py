"""The Dockerfiles, read instruction by instruction (dockerfile-parse): what they install and
how they run, beyond what hadolint checks. Docker is not needed: nothing is built.
"""

from __future__ import annotations

import importlib.metadata
import shlex

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.kube import ROOT

DOCKERFILES = sorted(p.name for p in (ROOT / "images").glob("Dockerfile.*"))
# pip options that take a value (the next word is not a package).
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url"}
PIP_VALUE_OPTIONS |= {"--extra-index-url", "-f", "--find-links", "-t", "--target"}


def final_stage(name: str) -> list[dict]:
    """The instructions after the last FROM (what the image that runs is made of)."""
    with open(ROOT / "images" / name, "rb") as f:
        structure = [
            i for i in DockerfileParser(fileobj=f).structure if i["instruction"] != "COMMENT"
        ]
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def env_of(stage: list[dict]) -> dict[str, str]:
    """ENV of the stage, the later one winning (dockerfile-parse's envs sees all stages)."""
    env = {}
    for ins in stage:
        if ins["instruction"] == "ENV":
            for word in shlex.split(ins["value"]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def commands(stage: list[dict]) -> list[list[str]]:
    """Every simple command of every RUN (split on &&, ;), as words."""
    out = []
    for ins in stage:
        if ins["instruction"] != "RUN":
            continue
        words, current = shlex.split(ins["value"].replace("\\\n", " ")), []
        for word in words + ["&&"]:
            if word in ("&&", ";", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def apt_packages(stage: list[dict]) -> dict[str, str]:
    """package -> pinned version of every `apt-get install`."""
    pkgs = {}
    for cmd in commands(stage):
        if cmd[:2] == ["apt-get", "install"]:
            for word in cmd[2:]:
                if not word.startswith("-"):
                    name, _, version = word.partition("=")
                    pkgs[name] = version
    return pkgs


def pip_installs(stage: list[dict]) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of every `pip install`."""
    out = []
    for cmd in commands(stage):
        if cmd[:2] != ["pip", "install"] and cmd[:4] != ["python", "-m", "pip", "install"]:
            continue
        args = cmd[cmd.index("install") + 1 :]
        opts, reqs, i = [], [], 0
        while i < len(args):
            if args[i] in PIP_VALUE_OPTIONS:
                opts += args[i : i + 2]
                i += 2
                continue
            (opts if args[i].startswith("-") else reqs).append(args[i])
            i += 1
        out.append((opts, reqs))
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_as_a_non_root_user_with_writable_home_and_caches(dockerfile):
    stage = final_stage(dockerfile)
    users = [i["value"] for i in stage if i["instruction"] == "USER"]
    assert users, "no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric and not root"
    env = env_of(stage)
    # /tmp is writable by any uid (and a memory- or disk-backed emptyDir in a pod).
    for key in ("HOME", "HF_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env.get(key, "").startswith("/tmp"), f"{key}={env.get(key)!r}"


def test_gpu_image_can_build_what_triton_compiles():
    """Triton (Liger kernels, fused_kernels=auto on a GPU) compiles its driver helper and
    launchers with the system C compiler on first use, against Python.h: the image needs a
    compiler and the C library headers, Python's headers (the official python image keeps
    them), and a writable Triton home and cache."""
    stage = final_stage("Dockerfile.gpu")
    base = stage[0]["value"]
    assert base.startswith("python:"), f"{base}: Python.h must come with the base image"
    pkgs = apt_packages(stage)
    assert {"gcc", "clang", "build-essential"} & set(pkgs), f"no C compiler in {sorted(pkgs)}"
    assert "libc6-dev" in pkgs or "build-essential" in pkgs, "no C library headers"
    assert all(pkgs.values()), f"unpinned apt packages: {pkgs}"
    env = env_of(stage)
    for key in ("TRITON_HOME", "TRITON_CACHE_DIR"):
        assert env.get(key, "").startswith("/tmp"), f"{key}={env.get(key)!r}"
    installed = {canonicalize_name(r) for _, reqs in pip_installs(stage) for r in reqs}
    assert "liger-kernel" in installed, "the train stage's default kernels"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_versions_are_the_tested_ones(dockerfile):
    """Every package an image installs is pinned in constraints.txt, the file the tests' venv
    is installed from, and gets its version from there alone (no second pin to drift)."""
    pins = constraints()
    installs = pip_installs(final_stage(dockerfile))
    assert installs
    for opts, reqs in installs:
        for req in reqs:
            if req == ".":  # the project itself (--no-deps)
                assert "--no-deps" in opts
                continue
            parsed = Requirement(req)
            assert not parsed.specifier, f"{req}: the version belongs in constraints.txt"
            assert canonicalize_name(parsed.name) in pins, f"{req} is not in constraints.txt"
        assert "constraints.txt" in opts[opts.index("-c") + 1 :][:1], opts


def test_the_venv_has_what_constraints_pin():
    """The other half of no drift: the tests run on exactly the pinned versions (torch's local
    build tag, +cpu, aside). Packages only the images install are not in the venv."""
    for name, version in constraints().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert have.split("+")[0] == version, f"{name}: venv {have}, constraints.txt {version}"


def test_constraints_satisfy_the_projects_own_requirements():
    """pyproject.toml states ranges, constraints.txt the versions inside them that the images
    and the venv install: a pin outside its range would install something pip never checks."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraints()
    reqs = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    checked = 0
    for line in reqs:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{line} vs {pins[name]}"
            checked += 1
    assert checked >= 10
