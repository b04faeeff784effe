"""The one compile / CUDA-graph helper of every sampler, and device timing.

A sampler compiles one function of device tensors with static shapes (``fullgraph``; CUDA graphs on
GPU, where a step is launch-bound at small batch). The warm-up runs inside ``fork_rng`` so compiling
never moves the RNG, and its seconds are reported apart from sampling time.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def default_compile_mode(device) -> str:
    """CUDA graphs on GPU (the step is launch-bound at small batch); inductor's default on CPU."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device) -> tuple:
    """Run fn() and return (result, seconds), synchronising the device around it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class CompiledFn:
    """``fn`` eager until :meth:`compile`; then torch.compile'd with static shapes.

    Under CUDA graphs every call marks a new step and returns a copy: a graph's outputs are
    overwritten by its next replay.
    """

    def __init__(self, fn: Callable, device):
        self.eager = fn
        self.fn = fn
        self.device = torch.device(device)
        self.cudagraphs = False
        self.compile_seconds = 0.0

    def compile(self, example_args: tuple, mode: Optional[str] = None, fullgraph: bool = True) -> float:
        """Compile for ``example_args``' shapes and warm up; returns the seconds spent."""
        mode = mode or default_compile_mode(self.device)
        self.cudagraphs = self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.fn = torch.compile(self.eager, mode=mode, fullgraph=fullgraph, dynamic=False)
        devices = [self.device] if self.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for _ in range(2 if self.cudagraphs else 1):  # CUDA graph trees record on the 2nd call
                self(*example_args)
            synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def __call__(self, *args):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.fn(*args).clone()
        return self.fn(*args)
