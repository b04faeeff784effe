"""Model FLOPs and the peak they are compared against (MFU) for the training table.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one forward of the real model, built on
the meta device (shapes only: no memory, no time, same count on every machine). A training image costs
3x its forward (forward + backward of activations and of weights), the usual "model FLOPs" convention:
recomputation by gradient checkpointing is *not* counted, so MFU is comparable across rows. The VAE
encode of the rows without feature pre-extraction is not counted either (it is not model work).

Peaks: on CUDA the dense tensor-core spec of the GPU (bf16 for mixed-precision rows, TF32 for fp32
rows), from a small table by GPU name; on a CPU, or a GPU not in the table, a peak measured in the same
run with a large matmul. ``PeakInfo.source`` says which.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: (bf16/fp16, TF32).
# Order matters: the first name fragment contained in torch.cuda.get_device_name() wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7),     # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("H200", 989.4, 494.7),
    ("GH200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L4", 121.0, 60.0),
)


@dataclass
class PeakInfo:
    """A peak throughput in FLOP/s and where the number comes from."""
    flops_per_s: float
    source: str


def forward_flops_per_image(build_model, input_size: int, in_channels: int = 4) -> int:
    """FLOPs of one forward pass for one image, counted on the meta device.

    ``build_model()`` must return the DiT (any backend flags; the count is of the math, so it is the
    same for every attention/adaLN backend). Counted at batch 2 and halved, so nothing batch-1-specific
    (a broadcast, a squeeze) skews it.
    """
    batch = 2
    with torch.device("meta"):
        model = build_model()
        x = torch.empty(batch, in_channels, input_size, input_size)
        t = torch.zeros(batch, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() // batch


def train_flops_per_image(forward_flops: int) -> int:
    """Model FLOPs of one training image: forward + backward = 3x forward (recompute not counted)."""
    return 3 * forward_flops


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                        repeats: int = 5) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) matmul on ``device`` (measured now)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first call pays for allocation / kernel selection
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_peak(gpu_name: str, mixed_precision: bool) -> float | None:
    """Data-sheet dense peak (FLOP/s) for a GPU name, bf16 or TF32; None if the GPU is not in the table."""
    for fragment, half, tf32 in GPU_PEAK_TFLOPS:
        if fragment.lower() in gpu_name.lower():
            return (half if mixed_precision else tf32) * 1e12
    return None


class PeakTable:
    """The peak each row's MFU is computed against, looked up or measured once per run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self._measured: dict[torch.dtype, float] = {}

    def measured(self, dtype: torch.dtype) -> float:
        if dtype not in self._measured:
            self._measured[dtype] = measure_matmul_peak(self.device, dtype)
        return self._measured[dtype]

    def peak(self, mixed_precision: bool) -> PeakInfo:
        """Peak for a row: spec bf16/TF32 on a known GPU; else a matmul measured in this run."""
        if self.device.type == "cuda":
            spec = spec_peak(self.name, mixed_precision)
            kind = "bf16" if mixed_precision else "TF32"
            if spec is not None:
                return PeakInfo(spec, f"{self.name} {kind} dense spec {spec / 1e12:.1f} TFLOP/s")
            dtype = torch.bfloat16 if mixed_precision else torch.float32
            value = self.measured(dtype)
            return PeakInfo(value, f"measured {kind} matmul peak {value / 1e12:.1f} TFLOP/s (GPU not in table)")
        value = self.measured(torch.float32)
        return PeakInfo(value, f"measured fp32 matmul peak (1024^3, this run) {value / 1e9:.1f} GFLOP/s")

    def info(self) -> dict:
        """What was looked up / measured, for the results header."""
        out = {"device_name": self.name}
        if self.device.type == "cuda":
            out["spec_bf16_tflops"] = (spec_peak(self.name, True) or 0) / 1e12 or None
            out["spec_tf32_tflops"] = (spec_peak(self.name, False) or 0) / 1e12 or None
            # Measured for reference only (an H100 reaches ~795 TFLOP/s bf16 in practice); MFU uses the spec.
            out["measured_bf16_matmul_tflops"] = round(self.measured(torch.bfloat16) / 1e12, 1)
        else:
            out["measured_fp32_matmul_gflops"] = round(self.measured(torch.float32) / 1e9, 1)
        return out


def mfu(images_per_s: float, flops_per_image: int, peak: PeakInfo) -> float:
    """Model FLOPs utilisation as a fraction of ``peak``."""
    return images_per_s * flops_per_image / peak.flops_per_s
