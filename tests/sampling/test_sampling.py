"""The samplers (dit_fast.sampling), the sampling CLIs' checks (dit_fast.sampling.flags) and sample writers
(dit_fast.sampling.images): CPU, tiny shapes."""
import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.diffusion import create_diffusion
from dit_fast.sampling.images import make_grid, save_image, to_uint8_hwc, write_npz_from_pngs, save_png
from dit_fast.sampling.flags import check_class_labels, check_official_defaults, sample_size
from dit_fast.sampling import build_sampler
from tests.sampling_helpers import build_tiny

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------- grid writer
def test_make_grid_layout_and_normalisation():
    # 3 images of 2x2 with 3 channels, 2 per row, padding 1: a 2x2 grid of cells (one left empty).
    x = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 3.0)])
    grid = make_grid(x, nrow=2, padding=1, normalize=True, value_range=(-1, 1))
    assert grid.shape == (3, 2 * 3 + 1, 2 * 3 + 1)
    expected = torch.zeros(7, 7)
    expected[1:3, 1:3] = 0.0   # -1 -> 0
    expected[1:3, 4:6] = 0.5   # 0 -> 0.5
    expected[4:6, 1:3] = 1.0   # 3 is clamped to 1 -> 1
    assert torch.equal(grid, expected.expand(3, 7, 7))
    assert torch.equal(x[2], torch.full((3, 2, 2), 3.0)), "input must not be modified"


def test_make_grid_single_and_grey_images():
    one = torch.rand(1, 3, 4, 5)
    assert torch.equal(make_grid(one, padding=2), one[0])  # torchvision: no padding for one image
    grey = torch.rand(2, 1, 3, 3)
    grid = make_grid(grey, nrow=4, padding=2, pad_value=0.25)
    assert grid.shape == (3, 3 + 4, 2 * 5 + 2)
    assert torch.equal(grid[1, 2:5, 2:5], grey[0, 0]) and torch.equal(grid[2, 2:5, 7:10], grey[1, 0])
    assert grid[0, 0, 0] == 0.25


def test_save_image_rounding_matches_torchvision(tmp_path):
    values = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.999, 1.5])
    x = values.view(1, 1, 1, 6).expand(2, 3, 1, 6).contiguous()
    path = save_image(x, tmp_path / "grid.png", nrow=4, normalize=True, value_range=(-1, 1))
    img = np.asarray(Image.open(path))
    assert img.shape == (1 + 4, 2 * 8 + 2, 3)
    # (v + 1) / 2 * 255 + 0.5, truncated: torchvision's save_image arithmetic.
    expected = np.floor(((values.clamp(-1, 1) + 1) / 2 * 255 + 0.5).numpy()).astype(np.uint8)
    assert np.array_equal(img[2, 2:8, 0], expected) and np.array_equal(img[2, 10:16, 2], expected)
    assert (img[:2] == 0).all() and (img[:, :2] == 0).all()


def test_to_uint8_hwc_is_the_original_conversion():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.996, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8_hwc(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 254, 255]  # clamp(127.5 x + 128), truncated


def test_npz_has_adm_layout_and_reports_missing(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:06d}.png")
    npz = write_npz_from_pngs(folder, 4, progress=False)
    assert npz == tmp_path / "samples.npz"
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (4, 4, 6, 3) and np.array_equal(arr, images[:4])
    with pytest.raises(FileNotFoundError, match="000005.png"):
        write_npz_from_pngs(folder, 6, progress=False)
    assert not list(tmp_path.glob("*.tmp*")), "a failed build must not leave temporary files"


# ------------------------------------------------------------------------------------- sampler
def _tiny_model(in_channels=4, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    model = build_tiny(input_size=8, in_channels=in_channels, num_classes=10, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("use_cfg", [True, False])
def test_eager_sampler_is_bitwise_the_diffusion_loop(kind, use_cfg):
    """Same seed -> the same samples and the same RNG position as diffusion.p_sample_loop."""
    model, diffusion = _tiny_model(), create_diffusion("6")
    z, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    if use_cfg:
        x, kwargs, fn = torch.cat([z, z]), dict(y=torch.cat([labels, torch.full((3,), 10)]), cfg_scale=4.0), \
            model.forward_with_cfg
    else:
        x, kwargs, fn = z, dict(y=labels), model.forward
    loop = diffusion.p_sample_loop if kind == "ddpm" else diffusion.ddim_sample_loop
    torch.manual_seed(1)
    with torch.no_grad():
        ref = loop(fn, x.shape, x, clip_denoised=False, model_kwargs=kwargs)
    ref_next = torch.randn(4)
    torch.manual_seed(1)
    sampler = build_sampler(model, diffusion, cfg_scale=4.0, num_classes=10, use_cfg=use_cfg, method=kind)
    ours = sampler.sample(z, labels)
    assert torch.equal(ours, ref.chunk(2)[0] if use_cfg else ref)
    assert torch.equal(torch.randn(4), ref_next)


def test_fixed_variance_model_matches_loop():
    model = _tiny_model(learn_sigma=False)
    diffusion = create_diffusion("5", learn_sigma=False)
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 3])
    torch.manual_seed(2)
    with torch.no_grad():
        ref = diffusion.p_sample_loop(model.forward, z.shape, z, clip_denoised=True, model_kwargs=dict(y=labels))
    torch.manual_seed(2)
    ours = build_sampler(model, diffusion, num_classes=10, use_cfg=False, clip_denoised=True).sample(z, labels)
    assert torch.equal(ours, ref)


def test_generator_makes_batches_independent_of_global_rng():
    model, diffusion = _tiny_model(), create_diffusion("4")
    sampler = build_sampler(model, diffusion, num_classes=10)
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    a = sampler.sample(z, labels, generator=torch.Generator().manual_seed(7))
    torch.randn(100)  # moving the global RNG must not matter
    b = sampler.sample(z, labels, generator=torch.Generator().manual_seed(7))
    c = sampler.sample(z, labels, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_autocasts_the_model_only():
    model, diffusion = _tiny_model(), create_diffusion("4")
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    ref = build_sampler(model, diffusion, num_classes=10).sample(z, labels, generator=torch.Generator().manual_seed(0))
    low = build_sampler(model, diffusion, num_classes=10, precision="bf16").sample(
        z, labels, generator=torch.Generator().manual_seed(0))
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sampler_step_is_the_diffusions_own_step(kind):
    """One reverse process: the sampler's per-step function equals diffusion.p_sample / ddim_sample
    with the guided model on the same x, t, labels and noise (bit for bit, eager fp32)."""
    model, diffusion = _tiny_model(), create_diffusion("5")
    sampler = build_sampler(model, diffusion, method=kind, cfg_scale=3.0, num_classes=10)
    torch.manual_seed(4)
    z = torch.randn(2, 4, 8, 8)
    x, y = torch.cat([z, z]), torch.tensor([3, 7, 10, 10])  # labels [3, 7] and the null label twice
    noise = torch.randn_like(x)
    t = sampler.step_indices(4)[2]  # the third step: an intermediate t
    assert t.tolist() == [2] * 4
    ours = sampler.step(x, t, y, noise)
    step = diffusion.p_sample if kind == "ddpm" else diffusion.ddim_sample
    with torch.no_grad():
        ref = step(lambda x_, t_, y: model.forward_with_cfg(x_, t_, y, 3.0), x, t, clip_denoised=False,
                   model_kwargs={"y": y}, noise=noise)["sample"]
    assert torch.equal(ours, ref)
    # ... and the model saw the respaced step's trained timestep value, as the diffusion's own loop.
    assert diffusion.schedule_on(t.device).model_timesteps[2].item() == diffusion.timestep_map[2]


def test_no_sampling_module_computes_schedule_coefficients():
    """The coefficients live in dit_fast.diffusion only: no sampling module reads a schedule table,
    builds one from betas or takes a square root / log of alphas itself."""
    import re
    from pathlib import Path

    import dit_fast.sampling
    banned = re.compile(r"alphas_cumprod|posterior_|sqrt_recip|np\.log|torch\.log|cumprod|log_betas|"
                        r"timestep_map|_SQRT|_COEF")
    folder = Path(dit_fast.sampling.__file__).parent
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in sorted(folder.glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not offenders, offenders


def test_no_test_imports_the_sampling_scripts():
    """sample.py / sample_ddp.py are one call of dit_fast.sampling.{grid,fid_set}.cli: tests import the
    library (importing the scripts would run them)."""
    import re
    from pathlib import Path
    tests = Path(__file__).resolve().parents[1]
    script = re.compile(r"^\s*(import (sample|sample_ddp)\b|from (sample|sample_ddp) import)", re.M)
    assert not [p.name for p in tests.rglob("*.py") if script.search(p.read_text())]


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by 16"):
        sample_size(100, 8, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        sample_size(30, 1, 4)
    assert sample_size(256, 8, 2) == 32 and sample_size(32, 1, 2) == 32
    with pytest.raises(ValueError, match=r"\[1000\].*outside \[0, 9\]|outside \[0, 9\]"):
        check_class_labels([3, 1000], 10)
    with pytest.raises(ValueError, match="--ckpt"):
        check_official_defaults("DiT-S/2", 256, 1000, "ema")
    with pytest.raises(ValueError, match="num_classes|labels"):
        build_sampler(_tiny_model(), create_diffusion("2"), num_classes=10).sample(torch.randn(2, 4, 8, 8),
                                                                             torch.tensor([1]))
    with pytest.raises(ValueError, match="sampler"):
        build_sampler(_tiny_model(), create_diffusion("2"), method="euler-ancestral")


# ---------------------------------------------------------------------------------------- GPU
@requires_cuda
def test_compiled_cuda_sampler_has_no_host_syncs_and_matches_eager():
    torch.manual_seed(0)
    model = build_tiny(input_size=8, in_channels=4, num_classes=10).cuda().eval()
    diffusion = create_diffusion("5")
    z, labels = torch.randn(4, 4, 8, 8, device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")
    eager = build_sampler(model, diffusion, num_classes=10)
    ref = eager.sample(z, labels, generator=torch.Generator("cuda").manual_seed(0))
    compiled = build_sampler(model, diffusion, num_classes=10)
    compiled.compile(z.shape)
    compiled.sample(z, labels)  # any remaining CUDA-graph recording (which synchronises) happens here
    g = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = compiled.sample(z, labels, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
