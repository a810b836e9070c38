"""leangen.parallel.ranks without a launcher: rank parsing, devices, backends, errors."""

import pytest
import torch

from leangen.errors import ConfigError, LeangenError
from leangen.parallel import ranks as distributed
from leangen.parallel.ranks import Ranks, rank_device, ranks_from_env


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = ranks_from_env()
    assert ranks == Ranks(0, 1, 0) and ranks.is_main and not ranks.distributed
    assert distributed.start(torch.device("cpu")) == ranks
    assert not torch.distributed.is_initialized()
    assert distributed.error_prefix() == ""


def test_ranks_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = ranks_from_env()
    assert ranks == Ranks(3, 4, 1) and not ranks.is_main and ranks.distributed
    assert distributed.error_prefix() == "rank 3: "


def test_bad_rank_variable_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="launch with torchrun"):
        ranks_from_env()


def test_each_rank_gets_its_local_gpu():
    assert rank_device("cuda", Ranks(1, 2, 1)) == torch.device("cuda", 1)
    assert rank_device("cuda", Ranks(0, 1, 0)) == "cuda"  # one process: unchanged
    assert rank_device("cpu", Ranks(1, 2, 1)) == "cpu"
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else "cpu"
    assert rank_device("auto", Ranks(1, 2, 1)) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_nccl_without_gpus_is_one_line():
    with pytest.raises(LeangenError, match="needs NCCL and GPUs"):
        distributed.start(torch.device("cuda", 0), Ranks(0, 2, 0))


def test_device_without_backend_is_refused():
    with pytest.raises(ConfigError, match="cannot run on several ranks"):
        distributed.start(torch.device("meta"), Ranks(0, 2, 0))


def test_timeout_from_env(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "5")
    assert distributed._timeout().total_seconds() == 5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=distributed.TIMEOUT_ENV):
        distributed._timeout()
