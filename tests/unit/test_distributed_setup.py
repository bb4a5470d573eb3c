"""distributed.setup before any process group exists: what it asks accelerate for, and what it refuses."""

import datetime

import pytest
import torch

from rlhfkit import distributed


def test_the_process_group_waits_as_long_as_the_run_says(monkeypatch):
    # NCCL's own default is 10 minutes, less than process 0 may spend saving a large model while the rest wait
    seen = {}
    monkeypatch.setattr("accelerate.PartialState", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.setup(torch.device("cpu"), timeout_s=7200) == torch.device("cpu")
    assert seen == {"cpu": True, "timeout": datetime.timedelta(hours=2)}


def test_a_process_without_a_gpu_of_its_own_is_refused_before_the_group_opens(monkeypatch):
    # two processes on a one-GPU machine: the second would fail deep in CUDA with "invalid device ordinal"
    monkeypatch.setattr("accelerate.PartialState", lambda **kwargs: pytest.fail("the group was opened"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1\) has no GPU of its own: this machine shows 1; .*"
                                         r"--train.device cpu"):
        distributed.setup(torch.device("cuda"))
