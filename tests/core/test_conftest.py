"""The test harness's own rules (tests/conftest.py): how `make test` hands tests to workers."""

from __future__ import annotations

from dataclasses import dataclass, field

import conftest


@dataclass
class Item:
    nodeid: str
    fixturenames: list[str]
    marks: list = field(default_factory=list)

    def add_marker(self, mark) -> None:
        self.marks.append(mark)


def test_files_sharing_a_costly_session_fixture_are_one_group():
    """Each xdist worker builds its own session fixtures: the DDP run the DDP, FSDP and node
    tests compare with is built once only if their files go to one worker."""
    items = [
        Item("tests/training/test_ddp.py::a", ["two_processes"]),
        Item("tests/training/test_ddp.py::b", ["quantized"]),
        Item("tests/training/test_fsdp.py::c", []),
        Item("tests/training/test_fsdp.py::d", ["quantized", "two_processes"]),
        Item("tests/backend/test_trainer_backend.py::e", ["kubeflow_trainer"]),
        Item("tests/core/test_env.py::f", []),
    ]
    conftest._group_files(items)
    groups = {}
    for item in items:
        (mark,) = item.marks
        assert mark.name == "xdist_group"
        groups[item.nodeid.rsplit("::", 1)[1]] = mark.args[0]
    assert groups == {
        "a": "two_processes",
        "b": "two_processes",
        "c": "two_processes",
        "d": "two_processes",
        "e": "kubeflow_trainer",
        "f": "tests/core/test_env.py",
    }
