"""The one process-group set-up of every entry point (train.py, sample_ddp.py, extract_features.py,
the benchmarks): the launcher's environment -> (rank, world size, device), joined group.

Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK; plain ``python`` is a world of
one. Training always joins a group, through DeepSpeed (a one-process group for plain python), so
its engine and collectives work unchanged; sampling and extraction join one only when world > 1.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's env; plain python = (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def free_port() -> int:
    """A TCP port free on this machine right now (for a one-process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        _, port = probe.getsockname()
    return port


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
            on_gpu = self.device.type == "cuda"
            dist.barrier(device_ids=[self.device.index] if on_gpu else None)

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


def cpu_allreduce_segments(port: str | int | None = None) -> list[Path]:
    """/dev/shm segments of DeepSpeed's CPU all-reduce for MASTER_PORT ``port`` (None: every port)."""
    port = "*" if port is None else str(port)
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _release_cpu_allreduce_segments() -> None:
    """DeepSpeed's CPU accelerator maps one 69 MB /dev/shm segment per rank at init and never unlinks
    it, so every CPU run -- and every killed one -- used to leave its segments in RAM until reboot.
    Once every rank has mapped every segment (init waits for the peers' segments; the barrier waits
    for the peers' waits) the names serve no one: each rank unlinks its own, the mappings live on."""
    world, me = dist.get_world_size(), dist.get_rank()
    if world > 1:
        dist.barrier()
    port = os.environ.get("MASTER_PORT")
    for segment in cpu_allreduce_segments(port):
        if port is not None and segment.name.endswith(f"_{port}_{me}"):
            segment.unlink(missing_ok=True)


def exit_leaving_group(code: int) -> None:
    """Exit with ``code``; when a process group is still joined (a failed run: a peer may be stuck in
    a collective, so no barrier and no teardown), flush and leave through ``os._exit``: letting the
    interpreter finalize beside gloo's live worker threads aborts the process now and then (SIGABRT,
    "terminate called without an active exception") and turns exit 1 into -6."""
    if dist.is_available() and dist.is_initialized():
        import logging
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)


DEFAULT_TIMEOUT_S = 600.0  # torch's own default: long enough for a slow checkpoint write


def init_distributed(device: str | None = None, *, use_deepspeed: bool = False,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the launcher's process group and pick this rank's device.

    device: None = cuda:LOCAL_RANK when CUDA is available, else cpu (ignored with use_deepspeed,
    where DeepSpeed's accelerator decides). use_deepspeed: join through ``deepspeed.init_distributed``
    (the backend of its accelerator: nccl on CUDA, gloo on CPU), always, a world of one included;
    otherwise ``torch.distributed`` (nccl / gloo) and only when WORLD_SIZE > 1. timeout_s bounds
    every collective: a rank that waits longer for a peer raises instead of idling forever.
    """
    rank, world, local_rank = env_world()
    dev = _pick_device(device, use_deepspeed, local_rank)
    here = False
    timeout = timedelta(seconds=timeout_s)
    if use_deepspeed:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        if "RANK" not in os.environ:  # plain `python train.py`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        here = not dist.is_initialized()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False, timeout=timeout)
        if get_accelerator().device_name() == "cpu":
            _release_cpu_allreduce_segments()
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, dev, here)


# ---------------------------------------------------------------- failures every rank sees

class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: a peer is stuck or dead."""


class RemoteError(RuntimeError):
    """Raised on every rank when the rank that computed a broadcast value failed."""


def broadcast_from_rank0(compute, rank: int):
    """Rank 0 runs ``compute()`` and every rank gets its value; if it raised, every rank raises an
    exception of the same kind (ValueError / FileNotFoundError / OSError, else RemoteError) with
    rank 0's message, so the others never wait in the broadcast for a value that will not come."""
    payload = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", compute())
        except (ValueError, OSError, RuntimeError) as err:
            payload[0] = ("error", type(err).__name__, str(err))
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(payload, src=0)
            raise
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    if payload[0][0] == "ok":
        return payload[0][1]
    kinds = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
             "NotADirectoryError": NotADirectoryError, "PermissionError": PermissionError}
    raise kinds.get(payload[0][1], RemoteError)(f"(on rank 0) {payload[0][2]}")


_ARRIVED = "dit_fast/arrived/{}"


def guarded_collective(fn, what: str, step: int, timeout_s: float):
    """Run the collective ``fn()``; a timeout or a dead peer becomes CollectiveTimeout naming the
    step and the ranks that never reached this point (read from the rendezvous store, where each
    rank notes the last step it arrived at; the store is served outside the stuck rank's Python)."""
    store, rank = _store(), dist.get_rank()
    if store is not None:
        store.set(_ARRIVED.format(rank), str(step))
    try:
        return fn()
    except RuntimeError as err:  # gloo: "Timed out ...", "Connection closed by peer"; nccl alike
        late = _late_ranks(store, step)
        who = f"rank(s) {late} never reached it" if late else "a peer failed or left"
        raise CollectiveTimeout(
            f"step {step}: {what} on rank {rank} did not complete within --collective-timeout "
            f"{timeout_s:g} s: {who} (stuck or dead; see that rank's output)") from err


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):  # private API: naming the rank is a bonus
        return None


def _late_ranks(store, step: int) -> list[int]:
    if store is None:
        return []
    late = []
    try:
        for r in range(dist.get_world_size()):
            key = _ARRIVED.format(r)
            if not store.check([key]) or int(store.get(key)) < step:
                late.append(r)
    except (RuntimeError, ValueError):  # the store's host (rank 0) may be the one that died
        return []
    return late
