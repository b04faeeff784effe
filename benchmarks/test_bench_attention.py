"""Attention at DiT-XL's head dim 72, bf16, one GPU: our Triton flash attention vs every SDPA backend.

Shapes (B, H, T, d): (128, 16, 256, 72) = DiT-XL/2 at 256 px, batch 128; (32, 16, 1024, 72) = 512 px.
q, k, v are the strided views of one packed (B, T, 3 * H * d) qkv projection, as in the model, for
every implementation. Implementations: ours ("triton"), torch SDPA pinned to one backend with
``torch.nn.attention.sdpa_kernel`` (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION; a backend
that refuses the shape is skipped), and the flash-attn package when installed. extra_info holds the GPU
time from ``triton.testing.do_bench`` (CUDA events, median) in milliseconds and
``TFLOP/s = flops / time`` with flops = 4 * B * H * T^2 * d forward and 3.5x that forward+backward
(backward = 2.5x forward, flash-attention's convention; the same count for every implementation).
Gradients are taken with respect to q, k, v (no packing copy). pytest-benchmark's own columns are
wall-clock times of one call + synchronize. No speed is asserted. Run:
    pytest benchmarks/test_bench_attention.py --benchmark-json benchmarks/results/attention-<gpu>.json
"""
import functools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(128, 16, 256, 72), (32, 16, 1024, 72)]
DTYPE = torch.bfloat16
IMPLS = ("triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn")


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


@functools.cache
def attention_function(impl):
    """(q, k, v) (B, H, T, d) -> (B, H, T, d) for one implementation, pinned to its backend."""
    if impl == "triton":
        from dit_fast_kernels.flash_attention import flash_attention
        return flash_attention
    if impl == "flash_attn":
        flash_attn = pytest.importorskip("flash_attn")

        def fa(q, k, v):  # flash-attn wants (B, T, H, d): our views' transposes are free
            return flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)
        return fa
    from torch.nn.attention import sdpa_kernel
    backend = sdpa_backends()[impl]

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return sdpa


def make_qkv(B, H, T, d, requires_grad):
    """Strided q, k, v views of one packed projection output, as DiT's attention makes them."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * d, device="cuda", dtype=DTYPE, generator=g)
    qkv.requires_grad_(requires_grad)
    return qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)


def first_call(fn, impl):
    """Run once (autotune / compile outside the timing); skip an implementation refusing the shape."""
    try:
        return fn()
    except RuntimeError as err:  # SDPA: "No available kernel" for a pinned backend
        pytest.skip(f"{impl} refuses this shape: {str(err).splitlines()[0]}")


def measure(benchmark, run, impl, shape, mode):
    import triton
    import triton.testing

    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
    B, H, T, d = shape
    flops = 4 * B * H * T * T * d * (3.5 if mode == "fwd_bwd" else 1.0)
    tflops = flops / (ms * 1e-3) / 1e12
    benchmark.group = f"attention {mode} {B}x{H}x{T}x{d} bf16"
    benchmark.extra_info.update(
        impl=impl, mode=mode, shape=list(shape), dtype=str(DTYPE), ms=ms, flops=flops, tflops=tflops,
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
    )

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=3)
    print(f"attention {mode} {shape} {impl}: {ms:.3f} ms, {tflops:.1f} TFLOP/s")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, shape, impl):
    fn = attention_function(impl)
    q, k, v = make_qkv(*shape, requires_grad=False)
    with torch.no_grad():
        first_call(lambda: fn(q, k, v), impl)
        measure(benchmark, lambda: fn(q, k, v), impl, shape, "fwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, shape, impl):
    fn = attention_function(impl)
    q, k, v = make_qkv(*shape, requires_grad=True)
    B, H, T, d = shape
    dout = torch.randn(B, T, H, d, device="cuda", dtype=DTYPE).transpose(1, 2)  # as the model's grad

    def run():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    first_call(run, impl)
    measure(benchmark, run, impl, shape, "fwd_bwd")
