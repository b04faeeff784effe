"""dit_fast.distributed: the launcher's environment, and a world of one that joins no group."""
import torch.distributed as dist

from dit_fast.distributed import env_world, free_port, init_distributed


def test_env_world_reads_the_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (5, 8, 1)


def test_plain_python_is_a_world_of_one_without_a_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    already = dist.is_initialized()  # an in-process DeepSpeed test may have left a world of one
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.initialized_here) == (0, 1, "cpu", False)
    assert dist.is_initialized() == already
    ctx.barrier()  # no-ops in a world of one
    ctx.close()
    assert 0 < free_port() < 65536
