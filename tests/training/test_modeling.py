"""training/modeling.py: the allocator setting the train stage asks for."""

import os
import types

import pytest
import torch

from qlora_kfp.training import modeling

ALLOC = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@pytest.fixture
def no_allocator_env(monkeypatch):
    """No allocator variable set; afterwards, those the function wrote are removed."""
    for k in ALLOC:  # set first, so that monkeypatch restores what the function writes
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


@pytest.fixture
def allocator(monkeypatch, no_allocator_env):
    """CUDA as the train stage finds it on a GPU node: started (bitsandbytes' import asks
    for the compute capability) before the stage asks for expandable segments; records
    what is set on the running allocator."""
    settings: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", settings.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: settings.append("cache emptied"))
    return settings


def test_started_cuda_gets_expandable_segments_on_the_running_allocator(allocator):
    # Before: only the environment was set, which a started allocator no longer reads, and
    # every 8B benchmark row said expandable_segments 0.
    assert modeling.prefer_expandable_segments()
    assert allocator == ["expandable_segments:True", "cache emptied"]


def test_a_running_allocator_that_refuses_the_setting_still_trains(allocator, monkeypatch, caplog):
    def refuse(settings):
        raise RuntimeError("expandable_segments cannot be changed now")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse)
    modeling.prefer_expandable_segments()  # no error: the run reports what the allocator does
    assert "expandable segments not set" in caplog.text


def test_the_environments_allocator_settings_are_kept(allocator, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert not modeling.prefer_expandable_segments()
    assert allocator == []
    assert "PYTORCH_ALLOC_CONF" not in os.environ


def test_rank_processes_inherit_the_setting(allocator):
    modeling.prefer_expandable_segments()
    assert {os.environ[k] for k in ALLOC} == {"expandable_segments:True"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_without_cuda_no_allocator_is_reported():
    assert modeling.allocator_expands() is None


def test_an_allocator_without_snapshots_is_no_error_at_the_end_of_training(monkeypatch):
    """The metric is read after training: ``backend:cudaMallocAsync`` has no snapshot, and
    refusing there would lose a finished run."""

    def refuse():
        raise RuntimeError("Calling snapshot with backend:cudaMallocAsync is not meaningful.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", refuse)
    assert modeling.allocator_expands() is None


def test_the_reserve_is_split_by_pool_and_stream(monkeypatch):
    """A segment on a side stream (the offload's copy streams) cannot serve a step's
    allocations: it is counted apart from the compute stream's two pools."""
    here = torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0
    segments = [
        {"stream": here, "segment_type": "large", "total_size": 3 * 2**30},
        {"stream": here, "segment_type": "large", "total_size": 2**29},
        {"stream": here, "segment_type": "small", "total_size": 2**21},
        {"stream": here + 4096, "segment_type": "large", "total_size": 2**28},
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=here)
    )
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    assert modeling.reserved_by_stream() == {
        "large_pool": 3.5,
        "small_pool": 0.002,
        "side_streams": 0.25,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_without_cuda_the_reserve_is_not_split():
    assert modeling.reserved_by_stream() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_started_gpu_new_segments_grow_in_place(no_allocator_env):
    torch.zeros(1, device="cuda")  # CUDA started, as after bitsandbytes' import
    assert modeling.prefer_expandable_segments()
    block = torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # a segment of its own
    assert modeling.allocator_expands()
    del block
