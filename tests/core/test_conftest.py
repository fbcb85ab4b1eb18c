"""The test harness's own rules (tests/conftest.py): how `make test` hands tests to workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def conftest(request):
    """tests/conftest.py as pytest loaded it. Not ``import conftest``: with another folder's
    conftest.py loaded after it (tests/training/), that name is the other module."""
    return request.config.pluginmanager.get_plugin(str(TESTS / "conftest.py"))


@pytest.mark.parametrize(
    "nodeid,scope",
    [
        ("tests/training/test_ddp.py::test_a", "two_processes"),
        ("tests/training/test_fsdp.py::test_b[x-y]", "two_processes"),
        ("tests/stages/test_train_nodes.py::test_c", "two_processes"),
        ("tests/backend/test_trainer_backend.py::test_d", "kubeflow_trainer"),
        ("tests/training/test_trainjob_trainer.py::test_e", "kubeflow_trainer"),
        ("tests/core/test_env.py::test_f", "tests/core/test_env.py"),
    ],
    ids=["ddp", "fsdp", "nodes", "trainer-backend", "trainjob-trainer", "any-other-file"],
)
def test_files_sharing_a_costly_session_fixture_go_to_one_worker(conftest, nodeid, scope):
    """Each xdist worker builds its own session fixtures: the DDP run the DDP, FSDP and node
    tests compare with is built once only if their files go to one worker."""
    assert conftest.worker_scope(nodeid) == scope


def test_a_file_using_a_shared_fixture_must_be_listed(conftest):
    items = [SimpleNamespace(nodeid="tests/new/test_x.py::t", fixturenames=["two_processes"])]
    with pytest.raises(pytest.UsageError, match=r"test_x.py uses two_processes: list it"):
        conftest._check_shared_files(items)


@pytest.mark.slow
def test_a_file_runs_on_one_worker_so_its_module_fixtures_are_built_once():
    """Two workers, as `make test` runs them: every test of a file on the same worker.
    (xdist's `--dist loadgroup` sent each test alone once pytest 9.2 took node ids as
    immutable: the tracking suite's three pipeline runs, a module fixture, ran on both.)"""
    root = Path(__file__).resolve().parents[2]
    files = ["tests/core/test_layout.py", "tests/core/test_conftest.py"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "-v",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            *files,
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    ran = re.findall(r"^\[(gw\d)\] .*? PASSED (\S+?)::", proc.stdout, re.M)
    workers = {path: {gw for gw, p in ran if p == path} for path in files}
    assert all(len(w) == 1 for w in workers.values()) and len(ran) > 6, (workers, ran)


def test_the_longest_units_go_out_first_and_xdist_keeps_that_order(conftest):
    """LONGEST_FIRST leads the collection, a group's files together; then xdist hands the
    units out in that order, not reordered by their number of tests (its default)."""
    files = {
        "tests/core/test_env.py::test_many": 80,  # many quick tests: xdist would send it first
        "tests/training/test_fsdp.py::test_f": 2,
        "tests/e2e/test_tracking_servers.py::test_t": 3,
        "tests/training/test_ddp.py::test_d": 2,
    }
    items = [
        SimpleNamespace(nodeid=f"{node}{i}", iter_markers=lambda: [])
        for node, n in files.items()
        for i in range(n)
    ]
    conftest._longest_files_first(items)
    units = list(dict.fromkeys(conftest.worker_scope(i.nodeid) for i in items))
    assert units == [
        "tests/e2e/test_tracking_servers.py",
        "two_processes",
        "tests/core/test_env.py",
    ]

    config = SimpleNamespace(
        option=SimpleNamespace(loadscopereorder=True), getvalue=lambda name: ["2*popen"]
    )
    sched = conftest.file_group_scheduling(config)

    class Worker:  # what the scheduler uses of xdist's WorkerController
        def __init__(self, name: str) -> None:
            self.gateway, self.shutting_down, self.sent = SimpleNamespace(id=name), False, []

        def send_runtest_some(self, indices) -> None:
            self.sent.extend(indices)

        def shutdown(self) -> None:
            self.shutting_down = True

    workers = [Worker("gw0"), Worker("gw1")]
    for w in workers:
        sched.add_node(w)
    for w in workers:
        sched.add_node_collection(w, [i.nodeid for i in items])
    sched.schedule()
    first = {w.gateway.id: sched.collection[w.sent[0]] for w in workers}
    assert first == {
        "gw0": "tests/e2e/test_tracking_servers.py::test_t0",
        "gw1": "tests/training/test_fsdp.py::test_f0",
    }


def test_a_longest_first_unit_that_is_gone_fails_the_collection(conftest, monkeypatch):
    monkeypatch.setattr(conftest, "LONGEST_FIRST", ("tests/e2e/test_gone.py",))
    with pytest.raises(
        pytest.UsageError, match=r"LONGEST_FIRST lists \['tests/e2e/test_gone.py'\]"
    ):
        conftest._longest_files_first([])
