"""Sampling throughput (images/s): eager vs torch.compile, fp32 vs bf16, with classifier-free guidance.

CPU: a small DiT (depth 4, width 128) on 8x8 latents, 8 images (16 with CFG), 10 DDPM steps.
GPU: DiT-XL/2 at 256 px (32x32 latents), 32 images (64 with CFG), random weights (speed does not
depend on them). To stay within ~2 minutes, each GPU row times MEASURED_STEPS steps and extrapolates
to the full 250-step loop (per-step cost is the same for every step); extra_info says so. The target
is >= 4 images/s on an H100 and >= 1.3x eager from compile alone; nothing is asserted.

extra_info: images_per_s (per full 250-step loop on GPU), step_ms, compile_s (excluded from the
timing), speedup_vs_eager (filled for compiled rows when the eager row of the same precision ran
first in the session), MFU against the GPU's data-sheet peak, device, versions, date, commit.
    pytest benchmarks/test_bench_sampling.py --benchmark-json benchmarks/results/sampling-<machine>.json
"""
import datetime
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dit_fast.diffusion import create_diffusion
from dit_fast.models import DiT, DiT_models
from dit_fast.sampling import build_sampler, default_compile_mode

FULL_STEPS = 250
MEASURED_STEPS = 10
_EAGER_STEP_S: dict = {}  # (device, precision) -> seconds per step of the eager row


def _environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "commit": commit}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(benchmark, model, device, batch, latent, steps, impl, precision, rounds):
    """Time Sampler.sample over `steps` respaced steps; returns seconds per step."""
    sampler = build_sampler(model, create_diffusion(str(steps)), cfg_scale=4.0, num_classes=1000,
                            precision=precision)
    shape = (batch, model.in_channels, latent, latent)
    compile_s = sampler.compile(shape, mode=default_compile_mode(device)) if impl == "compile" else 0.0
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(shape, generator=g, device=device)
    y = torch.randint(0, 1000, (batch,), generator=g, device=device)
    sampler.sample(z, y, generator=g)  # warm-up (allocator, cuDNN/cuBLAS heuristics, graph replay)
    _sync(device)

    def once():
        out = sampler.sample(z, y, generator=g)
        _sync(device)
        return out

    benchmark.pedantic(once, rounds=rounds, iterations=1)
    seconds = benchmark.stats.stats.min
    step_s = seconds / steps
    benchmark.extra_info.update(_environment(device), impl=impl, precision=precision, batch=batch,
                                model_batch_with_cfg=2 * batch, latent=latent, measured_steps=steps,
                                step_ms=round(step_s * 1e3, 3), compile_s=round(compile_s, 2))
    key = (device.type, precision)
    if impl == "eager":
        _EAGER_STEP_S[key] = step_s
    elif key in _EAGER_STEP_S:
        benchmark.extra_info["speedup_vs_eager"] = round(_EAGER_STEP_S[key] / step_s, 3)
    return step_s


@pytest.mark.parametrize("impl,precision", [("eager", "fp32"), ("compile", "fp32"),
                                            ("eager", "bf16"), ("compile", "bf16")])
def test_sampling_small_cpu(benchmark, impl, precision):
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4).eval()
    batch, steps = 8, 10
    step_s = _run(benchmark, model, device, batch, 8, steps, impl, precision, rounds=3)
    benchmark.extra_info["images_per_s"] = round(batch / (step_s * steps), 3)
    benchmark.extra_info["note"] = f"small DiT (depth 4, width 128), {steps} DDPM steps, CFG"


@pytest.fixture(scope="module")
def xl2_model():
    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU: the 675M-parameter CPU init takes longer than a row
        return DiT_models["DiT-XL/2"](input_size=32).eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl,precision", [("eager", "fp32"), ("eager", "bf16"), ("compile", "bf16")])
def test_sampling_dit_xl2_256_gpu(benchmark, xl2_model, impl, precision):
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the original sample.py
    torch.backends.cudnn.allow_tf32 = True
    model = xl2_model
    batch = 32
    start = time.perf_counter()
    step_s = _run(benchmark, model, device, batch, 32, MEASURED_STEPS, impl, precision, rounds=3)
    images_per_s = batch / (step_s * FULL_STEPS)
    info = benchmark.extra_info
    info["images_per_s"] = round(images_per_s, 3)
    info["note"] = (f"DiT-XL/2 256 px, CFG, {batch} images; timed {MEASURED_STEPS} steps, images/s "
                    f"extrapolated to {FULL_STEPS} steps (same cost every step); VAE decode not included")
    info["wall_s_row"] = round(time.perf_counter() - start, 1)
    try:
        from benchmarks.flops import forward_flops_per_image, spec_peak
        flops = forward_flops_per_image(lambda: DiT_models["DiT-XL/2"](input_size=32), 32)
        per_image = flops * 2 * FULL_STEPS  # CFG runs the model on 2 inputs per image
        peak = spec_peak(torch.cuda.get_device_name(device), mixed_precision=precision != "fp32")
        info["tflop_per_image"] = round(per_image / 1e12, 2)
        if peak:
            info["mfu"] = round(images_per_s * per_image / peak, 4)
    except Exception as e:  # the FLOP count is extra information, never a reason to lose the timing
        info["mfu_error"] = repr(e)
