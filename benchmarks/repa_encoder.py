"""REPA's frozen encoder in the training table: a randomly initialised DINOv2 of the right size (nothing
can be downloaded; weights do not change the compute) and the cost of its forward inside the step.

    folder = encoder_folder(tiny=False, root)      # DINOv2-B/14 (transformers' Dinov2Config defaults)
    cost = measure_encoder(encoder_call, encoder, device, steps)   # seconds, share, memory

The REPA row of benchmarks/table.py times the whole step (encoder included, as train.py runs it);
the encoder's own line is its forward on the row's batch, timed the same way (synchronised, after a
warm-up), and its share of the row's mean step.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

# The CPU table's encoder: DINOv2's layout, shrunk like the tiny DiT (2 blocks, width 64, patch 14).
TINY_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    patch_size=14, image_size=28)


def encoder_folder(tiny: bool, root: Path) -> Path:
    """A save_pretrained folder of a random DINOv2: tiny, or DINOv2-B/14 (Dinov2Config()'s defaults)."""
    from transformers import Dinov2Config, Dinov2Model
    folder = Path(root) / ("dinov2-tiny" if tiny else "dinov2-vit-b-random")
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**(TINY_ENCODER if tiny else {}))).save_pretrained(folder)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_encoder(encoder_call, encoder: torch.nn.Module, device: torch.device, steps: int,
                    mean_step_s: float) -> dict:
    """The encoder forward on the row's batch: seconds per step, share of the step, weights and the
    forward's peak memory above what was live before it (CUDA allocator; CPU: live tensor bytes)."""
    encoder_call()                                            # warm-up (autocast caches, kernels)
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        encoder_call()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        encoder_call()
        _sync(device)
        forward_peak = torch.cuda.max_memory_allocated(device) - before
    else:
        from train_step import LiveBytes
        tracker = LiveBytes()
        with tracker:
            encoder_call()
        forward_peak = tracker.peak
    return {"encoder_s": seconds, "encoder_share": seconds / mean_step_s,
            "encoder_weights_mb": weights / 2 ** 20, "encoder_forward_peak_mb": forward_peak / 2 ** 20}
