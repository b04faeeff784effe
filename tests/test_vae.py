"""dit_fast.vae: spec resolution, DiT's latent scaling, clear errors when the VAE is missing."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from dit_fast.vae import LATENT_SCALE, VAE, VAE_REPOS, VAEError, load_vae  # noqa: E402
from tests.vae_helpers import save_tiny_vae, tiny_autoencoder  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing in these tests may try the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_import_does_not_load_diffusers():
    code = ("import sys, dit_fast, dit_fast.vae, dit_fast.checkpoint; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_none_means_pixel_space():
    assert load_vae("none") is None and load_vae("None") is None and load_vae(None) is None


def test_load_from_directory(vae_dir):
    vae = load_vae(str(vae_dir))
    assert isinstance(vae, VAE)
    assert vae.latent_channels == 4 and vae.downsample == 2 and vae.dtype == torch.float32
    assert not any(p.requires_grad for p in vae.vae.parameters()) and not vae.vae.training
    ref = tiny_autoencoder()
    for (k, a), b in zip(vae.vae.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_pipeline_directory_with_vae_subfolder(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    assert load_vae(str(tmp_path)).latent_channels == 4


def test_encode_decode_shapes_and_scale(vae_dir):
    vae = load_vae(str(vae_dir))
    ref = tiny_autoencoder()
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 6) and not z.requires_grad
    # Same posterior sample, unscaled, from diffusers directly: ours is exactly 0.18215x it.
    raw = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, raw.detach() * LATENT_SCALE, rtol=0, atol=0)
    z2 = vae.encode(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, z2, rtol=0, atol=0)  # reproducible with a generator
    img = vae.decode(z)
    assert img.shape == (2, 3, 16, 12)
    torch.testing.assert_close(img, ref.decode(z / 0.18215).sample.detach(), rtol=0, atol=0)


def test_bad_shapes_are_clear(vae_dir):
    vae = load_vae(str(vae_dir))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_bfloat16(vae_dir):
    vae = load_vae(str(vae_dir), dtype=torch.bfloat16)
    z = vae.encode(torch.zeros(1, 3, 8, 8))
    assert vae.dtype == torch.bfloat16 and z.dtype == torch.bfloat16


def test_named_specs_map_to_stabilityai(monkeypatch):
    import dit_fast.vae as vae_module

    asked = []
    def fake_hub(repo, dtype):
        asked.append(repo)
        return tiny_autoencoder()

    monkeypatch.setattr(vae_module, "_from_hub", fake_hub)
    assert load_vae("ema").latent_channels == 4 and load_vae("mse") is not None
    load_vae("someone/custom-vae")
    assert asked == ["stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse", "someone/custom-vae"]


def test_missing_repo_offline_is_clear():
    repo = "dit-fast-tests/no-such-vae"  # never in any cache
    with pytest.raises(VAEError) as info:
        load_vae(repo)
    msg = str(info.value)
    assert repr(repo) in msg and "nothing can be downloaded" in msg
    assert f"huggingface-cli download {repo} --local-dir DIR" in msg
    assert "--vae DIR" in msg and "--vae none" in msg


def test_unknown_spec_and_broken_directory(tmp_path):
    with pytest.raises(VAEError, match="not 'ema', 'mse', 'none'"):
        load_vae(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(VAEError, match="config.json"):
        load_vae(str(tmp_path))  # exists but holds no VAE
