"""The one process-group set-up of every entry point (train.py, sample_ddp.py, extract_features.py,
the benchmarks): the launcher's environment -> (rank, world size, device), joined group.

Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK; plain ``python`` is a world of
one. Training always joins a group, through DeepSpeed (a one-process group for plain python), so
its engine and collectives work unchanged; sampling and extraction join one only when world > 1.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's env; plain python = (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def free_port() -> int:
    """A TCP port free on this machine right now (for a one-process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_uses_cuda() -> bool:
    """Whether DeepSpeed's accelerator is CUDA (DS_ACCELERATOR=cpu keeps a GPU machine on the CPU)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cuda" and torch.cuda.is_available()


@dataclass
class DistContext:
    """Where this process stands: its rank, the world, its device, and whether it joined the group."""

    rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the group if this context joined it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(name: str | None, use_deepspeed: bool, local_rank: int) -> torch.device:
    if use_deepspeed:
        name = "cuda" if deepspeed_uses_cuda() else "cpu"
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None, *, use_deepspeed: bool = False) -> DistContext:
    """Join the launcher's process group and pick this rank's device.

    device: None = cuda:LOCAL_RANK when CUDA is available, else cpu (ignored with use_deepspeed,
    where DeepSpeed's accelerator decides). use_deepspeed: join through ``deepspeed.init_distributed``
    (the backend of its accelerator: nccl on CUDA, gloo on CPU), always, a world of one included;
    otherwise ``torch.distributed`` (nccl / gloo) and only when WORLD_SIZE > 1.
    """
    rank, world, local_rank = env_world()
    dev = _pick_device(device, use_deepspeed, local_rank)
    here = False
    if use_deepspeed:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        if "RANK" not in os.environ:  # plain `python train.py`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        here = not dist.is_initialized()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, dev, here)
