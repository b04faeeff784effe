"""Export a DiT checkpoint as a diffusers DiTPipeline folder (the script is export_diffusers.py;
``python -m dit_fast.export_diffusers`` runs the same ``cli``).

    python export_diffusers.py --ckpt results/000-DiT-XL-2/checkpoints/step-0400000 --out DiT-diffusers
    python export_diffusers.py --ckpt ema.pt --out digits --model DiT-S/2 --depth 4 \\
        --hidden-size 128 --num-heads 4 --image-size 8 --vae none --in-channels 1 --num-classes 10

writes DIR/transformer/ (config.json + diffusion_pytorch_model.safetensors, loadable with
``DiTTransformer2DModel.from_pretrained``), DIR/scheduler/ (our betas, trailing timesteps),
DIR/vae/ when --vae names a VAE (ema/mse from the local cache, or a local folder), and
DIR/model_index.json, so ``DiTPipeline.from_pretrained(DIR)`` runs where diffusers supports the
model (1000 classes: DiTPipeline hard-codes the null label 1000; square sizes).

The folder is built next to DIR under a temporary name, checked, then renamed into place: an error
never leaves a half folder. The check loads the transformer with diffusers (when installed) and
compares it with our model; diffusers' DiT embeds timesteps with slightly other frequencies than
the original (see dit_fast.checkpoint.diffusers), so the check reports both the exact-mapping error
(with the original frequencies, must be <= 1e-5) and the stock diffusers difference.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..sampling.solvers import SOLVERS
from . import diffusers as diffusers_format
from .loading import load_into_model, load_state_dict

SCHEDULERS = tuple(SOLVERS) + ("ddim",)
EXACT_TOLERANCE = 1e-5  # relative error of the exported transformer (fp32) against ours


def build_parser() -> argparse.ArgumentParser:
    """The export's flags: sample.py's model flags plus --out, --scheduler, --class-names."""
    from ..cli import OneLineParser
    from ..config import add_model_flags

    p = OneLineParser(prog="export_diffusers.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a train.py run dir (model flags come from its saved config), a "
      "checkpoints/step-NNNNNNN dir or its EMA file, our checkpoint (.pt/.safetensors) or an official name")
    a("--out", required=True, help="the pipeline folder to write")
    add_model_flags(p, defaults=False)
    a("--vae", default=None, help="ema | mse | a local diffusers VAE dir | none (no vae/ is written); default mse")
    a("--in-channels", type=int, default=None, help="image channels with --vae none (3)")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(vae_default="mse")
    a("--scheduler", choices=SCHEDULERS, default="dpm-solver++", help="the pipeline's default scheduler")
    a("--class-names", default=None,
      help="id2label: a text file (one name per line, line i = class i) or an ImageFolder root "
           "(its sorted class folders, the order training used)")
    a("--overwrite", action="store_true", help="replace an existing --out folder")
    a("--no-check", action="store_true", help="skip loading the export back with diffusers")
    return p


def build_model(args):
    """(our DiT from the flags or the run's saved config, as sample.py builds it, with the
    checkpoint's weights, fp32, eval; the sin-cos positional table the model computed at init,
    before the checkpoint overwrote it). Fills ``args`` with the resolved model values."""
    from dit_fast.models import build_model as build_dit
    from dit_fast.sampling.flags import resolve_run

    m, _, vae, objective, _, source = resolve_run(args)
    if objective != "diffusion":  # DiTPipeline's schedulers would sample a velocity field as noise
        raise ValueError(f"--ckpt is a {objective} run; diffusers' DiTPipeline samples diffusion models only")
    args.model, args.image_size, args.num_classes, args.vae = m.model, m.image_size, m.num_classes, vae
    args.latent_norm = source.config.data.latent_norm if source and source.config else None
    args.in_channels, args.learn_sigma = m.in_channels, m.learn_sigma
    model = build_dit(m, attn_backend="sdpa", adaln_backend="torch")
    table = model.pos_embed.detach().clone()
    load_into_model(model, load_state_dict(source.weights), hint="the checkpoint does not fit the model "
                    "flags (--model, --image-size, --num-classes, --vae/--in-channels, --depth/--hidden-size/"
                    "--num-heads, --learn-sigma)")
    return model.float().eval(), table


def check_pos_embed(model, table) -> None:
    """diffusers recomputes the sin-cos positional table instead of storing ours: they must agree."""
    err = (model.pos_embed - table).abs().max().item()
    if err > 1e-6:
        raise diffusers_format.DiffusersFormatError(
            f"the checkpoint's pos_embed is not DiT's fixed sin-cos table (max difference {err:.3g}); "
            "diffusers recomputes that table, so the exported model would compute something else")


def read_class_names(spec, num_classes: int) -> dict | None:
    """{"0": name, ...} from a names file or an ImageFolder root; None without --class-names."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_dir())
    elif path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"--class-names {spec}: no such file or folder")
    if len(names) != num_classes:
        raise ValueError(f"--class-names gives {len(names)} names for --num-classes {num_classes}")
    return {str(i): name for i, name in enumerate(names)}


def scheduler_files(name: str, learn_sigma: bool) -> dict:
    """The scheduler_config.json of ``name`` on DiT's training schedule (1000 linear betas)."""
    from dit_fast.diffusion import create_diffusion
    from dit_fast.sampling.solvers import scheduler_config

    diffusion = create_diffusion("", learn_sigma=learn_sigma)
    if name == "ddim":
        config = dict(scheduler_config("dpm-solver++", diffusion), clip_sample=False, set_alpha_to_one=True)
        for key in SOLVERS["dpm-solver++"][1]:
            config.pop(key)
        return {"_class_name": "DDIMScheduler", **config}
    return {"_class_name": SOLVERS[name][0], **scheduler_config(name, diffusion)}


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"  # written without diffusers installed; diffusers only compares it for warnings


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_vae(spec: str, folder: Path, latent_norm: dict | None = None) -> bool:
    """vae/ from --vae (through dit_fast.vae, so ema/mse come from the local cache), its config
    carrying the run's latent normalisation (``latent_norm``; None: the VAE's own); False for none
    and for a hub VAE that is not cached here (the folder is still useful; the note says how)."""
    from dit_fast.latent_norm import LatentNorm
    from dit_fast.vae import VAEError, is_pixel_space, load_vae

    if is_pixel_space(spec):
        return False
    try:
        vae = load_vae(spec, norm=LatentNorm.from_dict(latent_norm, "the run's config"))
    except VAEError as e:
        if Path(spec).expanduser().is_dir():
            raise
        print(f"Note: no vae/ written ({str(e).splitlines()[0]}); pass one to DiTPipeline.from_pretrained("
              f"DIR, vae=AutoencoderKL.from_pretrained(...)) or rerun with --vae DIR.")
        return False
    vae.vae.register_to_config(**diffusers_latent_config(vae.norm))
    vae.vae.save_pretrained(str(folder), safe_serialization=True)
    return True


def diffusers_latent_config(norm) -> dict:
    """The AutoencoderKL config keys that record ``norm`` (a LatentNorm) in diffusers' terms.

    config mode: scaling_factor and shift_factor (DiTPipeline decodes latents / scaling_factor and
    ignores shift_factor: a shifted autoencoder needs dit_fast's sampler or an added shift).
    channel mode: latents_mean / latents_std with scaling_factor 1 (the convention of diffusers'
    SDXL pipelines: z * std / scaling_factor + mean); DiTPipeline reads neither, so it decodes such
    a model wrongly: sample with dit_fast (README, "Autoencoders").
    """
    if norm.mode == "config":
        return dict(scaling_factor=norm.scale, shift_factor=norm.shift, latents_mean=None, latents_std=None)
    return dict(scaling_factor=1.0, shift_factor=None, latents_mean=list(norm.mean),
                latents_std=list(norm.std))


def pipeline_norm_note(latent_norm: dict | None) -> str | None:
    """What DiTPipeline cannot undo of a run's latent normalisation (it divides by scaling_factor only)."""
    norm = latent_norm or {}
    if norm.get("mode") == "channel":
        what = "per channel (vae/config.json records latents_mean and latents_std)"
    elif norm.get("shift"):
        what = "with a shift (vae/config.json records shift_factor)"
    else:
        return None
    return (f"Note: DiTPipeline undoes only vae.config.scaling_factor, but this model's latents are "
            f"normalised {what}: sample with dit_fast (sample.py --ckpt RUN), or undo it before vae.decode.")


def write_folder(model, table, args, folder: Path) -> None:
    """Everything of the pipeline folder into ``folder`` (a fresh temporary directory)."""
    from safetensors.torch import save_file

    check_pos_embed(model, table)
    config = diffusers_format.transformer_config(model)
    state = diffusers_format.to_diffusers_state_dict(model.state_dict())
    version = _diffusers_version()
    _write_json(folder / "transformer" / "config.json", {**config, "_diffusers_version": version})
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    scheduler = scheduler_files(args.scheduler, args.learn_sigma)
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": version})
    has_vae = write_vae(args.vae, folder / "vae", getattr(args, "latent_norm", None))
    _write_json(folder / "model_index.json", {
        "_class_name": "DiTPipeline", "_diffusers_version": version,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "vae": ["diffusers", "AutoencoderKL"] if has_vae else [None, None],
        "id2label": read_class_names(args.class_names, args.num_classes),
    })


def check_export(model, folder: Path) -> dict:
    """Load DIR/transformer with diffusers and compare it with ``model`` on random inputs (fp32).

    Returns {"exact": rel. error with the original timestep frequencies, "stock": without};
    raises if the exact one exceeds EXACT_TOLERANCE. Skipped (None) without diffusers.
    """
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None
    import importlib.util
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning.
    theirs = DiTTransformer2DModel.from_pretrained(
        str(folder / "transformer"), local_files_only=True,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None).eval()
    g = torch.Generator().manual_seed(0)
    side = model.x_embedder.img_size[0]
    x = torch.randn(2, model.in_channels, side, side, generator=g)
    t = torch.tensor([999, 37])
    y = torch.tensor([0, model.num_classes])  # a real class and the null class
    with torch.no_grad():
        ours = model(x, t, y)
        rel = lambda other: ((other - ours).norm() / ours.norm().clamp_min(1e-30)).item()  # noqa: E731
        stock = rel(theirs(x, timestep=t, class_labels=y).sample)
        diffusers_format.use_original_timestep_frequencies(theirs)
        exact = rel(theirs(x, timestep=t, class_labels=y).sample)
    if not exact <= EXACT_TOLERANCE:
        raise RuntimeError(f"the exported transformer differs from ours by {exact:.3g} (relative), "
                           f"more than {EXACT_TOLERANCE}: the export is wrong; nothing was written")
    return {"exact": exact, "stock": stock}


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out`` (an existing ``out`` is moved aside first and
    removed after), then fsync the parent so the rename survives a crash."""
    from ..atomic import fsync_dir

    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def main(argv=None) -> dict:
    """Run the export; returns {"out": Path, "check": {...} or None}."""
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    model, table = build_model(args)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        write_folder(model, table, args, tmp)
        check = None if args.no_check else check_export(model, tmp)
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Wrote the diffusers DiTPipeline folder {out} (transformer/, scheduler/ {args.scheduler}"
          f"{', vae/' if (out / 'vae').is_dir() else ''}, model_index.json).")
    if check is not None:
        print(f"Checked with diffusers: relative error {check['exact']:.2g} with the original DiT's timestep "
              f"frequencies (diffusers_format.use_original_timestep_frequencies); stock diffusers' DiT "
              f"differs from the original by {check['stock']:.2g} (its timestep embedding).")
    note = pipeline_norm_note(getattr(args, "latent_norm", None))
    if note:
        print(note)
    if args.num_classes != 1000:
        print("Note: DiTPipeline hard-codes the null class 1000, so it only guides 1000-class models; "
              "load transformer/ and sample with dit_fast (sample.py --ckpt DIR/transformer).")
    return {"out": out, "check": check}


def cli(argv=None) -> int:
    """Entry point: bad flags, a checkpoint that does not fit, or a model diffusers cannot hold end
    with one clear line and exit code 2 (dit_fast.cli); returns the exit code."""
    from ..cli import run_entry
    # RuntimeError: the check found the export wrong (nothing was written); one line says so.
    return run_entry(main, "export_diffusers.py", argv, extra=(RuntimeError,))
