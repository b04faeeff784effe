"""Autoencoders as DiT uses them (diffusers AutoencoderKL): images <-> normalised latents.

The latent normalisation comes from the autoencoder (its config's scaling_factor / shift_factor: SD's
VAEs give DiT's 0.18215, no shift) or from per-channel statistics measured at extraction
(dit_fast.latent_norm); latent channels and downsampling come from its config too.

diffusers is imported inside the functions that need it: ``import dit_fast`` never imports it
and never touches the network. ``--vae none`` (pixel-space diffusion) needs no VAE at all.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from .latent_norm import SD_LATENT_SCALE, LatentNorm

# The SD VAEs' scale (from LDM), which their configs give; kept under its old name for importers.
LATENT_SCALE = SD_LATENT_SCALE

VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pixel_space(spec) -> bool:
    """``--vae none``: diffusion on the pixels themselves, no VAE."""
    return spec is None or str(spec).lower() == "none"


def downsample_of(block_out_channels) -> int:
    """Pixels per latent along a side of an AutoencoderKL: one halving per block after the first."""
    return 2 ** (len(block_out_channels) - 1)


def vae_config(spec) -> dict | None:
    """The AutoencoderKL config.json of ``--vae spec``, read without loading the VAE (the original
    builds the model before the VAE; keeping that order keeps the RNG stream): a local diffusers
    directory (or its vae/), else the Hugging Face cache; None when it is not here (the SD VAEs'
    values are then assumed) or in pixel space."""
    if is_pixel_space(spec):
        return None
    local = Path(str(spec)).expanduser()
    for config in (local / "config.json", local / "vae" / "config.json"):
        if config.is_file():
            return json.loads(config.read_text())
    repo = VAE_REPOS.get(str(spec), str(spec))
    if _REPO_ID.match(repo):
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(repo, "config.json")
        except Exception:  # no huggingface_hub, a malformed id: fall back to SD's values
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return json.loads(Path(cached).read_text())
    return None


def vae_downsample(spec) -> int:
    """Pixels per latent along a side for ``--vae spec``: 1 for "none", else from its config
    (8, the SD VAEs', when the config is not here)."""
    if is_pixel_space(spec):
        return 1
    config = vae_config(spec)
    return downsample_of(config["block_out_channels"]) if config else 8


def model_channels(spec, pixel_channels: int = 3) -> int:
    """Channels the DiT sees for ``--vae spec``: the image's ``pixel_channels`` in pixel space, else the
    autoencoder config's ``latent_channels`` (the one place this is decided; 4, the SD VAEs', when
    the config is not here)."""
    if is_pixel_space(spec):
        return pixel_channels
    config = vae_config(spec)
    return int(config.get("latent_channels", 4)) if config else 4


class VAEError(RuntimeError):
    """The VAE could not be found or loaded."""


class VAE:
    """An AutoencoderKL with a latent normalisation: images in [-1, 1] <-> normalised latents.

    Attributes: ``vae`` (the diffusers module, eval mode, frozen), ``norm`` (a LatentNorm; default:
    the config's scaling_factor / shift_factor), ``latent_channels``, ``downsample`` (pixels per
    latent along each side: 8 for the SD VAEs).
    """

    def __init__(self, vae, norm: LatentNorm | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.norm = norm if norm is not None else LatentNorm.from_vae_config(vae.config)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = downsample_of(vae.config.block_out_channels)
        self.in_channels = int(vae.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> normalised latents (N, latent_channels, H/ds, W/ds):
        ``self.norm.normalize(encode_raw(x))`` (SD's VAEs: raw * 0.18215)."""
        return self.norm.normalize(self.encode_raw(x, generator))

    @torch.no_grad()
    def encode_raw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> raw latents (N, latent_channels, H/ds, W/ds).

        The latent is sampled from the posterior, as fast-DiT's extract_features does; pass a
        ``generator`` (on the VAE's device) for reproducible samples.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"VAE.encode expects images of shape (N, {self.in_channels}, H, W) in [-1, 1]; "
                             f"got {tuple(x.shape)}.")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"Image size {tuple(x.shape[2:])} is not divisible by the VAE's downsampling "
                             f"factor {self.downsample}; resize or crop (e.g. --image-size 256).")
        x = x.to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.sample(generator=generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, latent_channels, h, w) -> images (N, C, h*ds, w*ds), about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"VAE.decode expects latents of shape (N, {self.latent_channels}, h, w); got "
                             f"{tuple(z.shape)}. Is the model's in_channels the VAE's latent_channels?")
        z = z.to(self.device, self.dtype)
        return self.vae.decode(self.norm.denormalize(z)).sample

    def to(self, device=None, dtype=None) -> "VAE":
        self.vae.to(device=device, dtype=dtype)
        return self


def load_vae(spec, device="cpu", dtype=torch.float32, norm: LatentNorm | None = None) -> VAE | None:
    """Load the VAE named by ``spec``; ``None`` for ``"none"`` (pixel-space diffusion). ``norm``:
    the latent normalisation the latents were made with (a run's record); default: the config's.

    spec: ``"ema"`` / ``"mse"`` (stabilityai/sd-vae-ft-ema / -mse), a local directory written by
    ``save_pretrained`` or ``huggingface-cli download`` (a ``vae/`` subfolder is found too), or
    another Hugging Face repo id. Hub ids are first looked up in the local cache; the network is
    tried only when ``HF_HUB_OFFLINE`` is not set. Failure raises ``VAEError`` saying how to
    get the files.
    """
    if is_pixel_space(spec):
        return None
    check_vae_spec(spec)
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        vae = _from_directory(local, dtype)
    else:
        vae = _from_hub(VAE_REPOS.get(spec, spec), dtype)
    if norm is not None and norm.channels not in (None, int(vae.config.latent_channels)):
        raise VAEError(f"the VAE {spec!r} has {vae.config.latent_channels} latent channels, the "
                       f"latent normalisation {norm.channels}: not the VAE the latents came from")
    return VAE(vae.to(device), norm)


def check_vae_spec(spec) -> None:
    """Raise VAEError for a --vae that can never load (checked before anything is created)."""
    if is_pixel_space(spec):
        return
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        raise VAEError(f"--vae {spec!r} is a file; give a diffusers AutoencoderKL directory")
    if not (local.is_dir() or spec in VAE_REPOS or _REPO_ID.match(spec)) or (
            spec.startswith(("/", ".", "~")) and not local.exists()):
        raise VAEError(
            f"--vae {spec!r} is not 'ema', 'mse', 'none', an existing directory or a Hugging Face "
            f"repo id (owner/name). If it is meant to be a directory, check the path.")


def _load_kwargs(dtype) -> dict:
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning.
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    return dict(torch_dtype=dtype, low_cpu_mem_usage=has_accelerate)


def _from_directory(path: Path, dtype):
    from diffusers import AutoencoderKL

    subfolder = None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        subfolder = "vae"  # a whole Stable Diffusion pipeline directory
    try:
        return AutoencoderKL.from_pretrained(
            str(path), subfolder=subfolder, local_files_only=True, **_load_kwargs(dtype))
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ...
        raise VAEError(
            f"Could not load a VAE (diffusers AutoencoderKL) from the directory {path}: {e}\n"
            f"It should hold config.json and diffusion_pytorch_model.safetensors (or .bin)."
        ) from e


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _from_hub(repo_id: str, dtype):
    from diffusers import AutoencoderKL

    try:
        # The local cache first: no request at all when the files are already here.
        return AutoencoderKL.from_pretrained(repo_id, local_files_only=True, **_load_kwargs(dtype))
    except Exception as cached_error:
        if _hub_offline():
            raise _missing_vae(repo_id, cached_error, offline=True) from cached_error
    try:
        return AutoencoderKL.from_pretrained(repo_id, **_load_kwargs(dtype))
    except Exception as e:
        raise _missing_vae(repo_id, e, offline=False) from e


def _missing_vae(repo_id: str, error: Exception, offline: bool) -> VAEError:
    why = ("HF_HUB_OFFLINE is set, so nothing can be downloaded here" if offline
           else "downloading it failed (no network?)")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return VAEError(
        f"The VAE {repo_id!r} is not in the local Hugging Face cache and {why} ({first_line}).\n"
        f"Get it on a machine with network access:\n"
        f"    huggingface-cli download {repo_id} --local-dir DIR\n"
        f"copy DIR here and pass --vae DIR. Or use --vae none to train and sample in pixel space "
        f"without a VAE.")
