"""Speed-quality table of the samplers: class accuracy and Fréchet distance against model evaluations.

    python benchmarks/sampler_table.py                      # the digits demo model (trains it once)
    python benchmarks/sampler_table.py --rows ddpm:250,dpm-solver++:10 --samples-per-class 20
    python benchmarks/sampler_table.py --xl-timing --compile --precision bf16   # GPU: DiT-XL/2 img/s
    python benchmarks/sampler_table.py --rows "" --flow-demo-dir results/demo-flow   # flow rows only

Quality mode reuses the demo end to end: the model trained by ``python -m dit_fast.demo`` (an
existing ``--demo-dir`` run is reused; otherwise the demo is run once), dit_fast.sampling.build_sampler
for every sampler, and dit_fast.scoring.DigitScorer (an independent classifier's accuracy and the
Fréchet distance of its features). Every row samples the same x_T and labels. NFE counts model
forward passes (one batched CFG forward each; Heun: 2 x steps - 1). The ``--flow-rows`` run SiT's
ODE (euler, heun: steps = grid points; dopri5: adaptive, NFE counted) and SDE (Euler-Maruyama,
diffusion form sigma, mean last step) on the flow demo's model (``--objective flow``).

XL timing mode measures images/s of DiT-XL/2 at 256x256 (latent 32x32) per sampler with random
weights (or ``--model-ckpt``), no quality; it is meant for a GPU.

Writes benchmarks/results/samplers-<digits|xl>-<device>-<date>.{md,json,png}, naming the machine,
the versions, the commit and the date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "kernels", ROOT):  # runnable from a fresh clone without `pip install -e .`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

import report  # noqa: E402
import sampler_plot  # noqa: E402

DEFAULT_ROWS = ("ddpm:250,ddpm:100,ddpm:50,ddim:50,ddim:25,ddim:10,dpm-solver++:25,dpm-solver++:10,"
                "dpm-solver++:5,unipc:10,unipc:5,euler:25,heun:10")
# flow row name -> (mode, sampling method)
FLOW_SAMPLERS = {"flow-euler": ("ODE", "euler"), "flow-heun": ("ODE", "heun"), "flow-dopri5": ("ODE", "dopri5"),
                 "flow-sde-euler": ("SDE", "Euler"), "flow-sde-heun": ("SDE", "Heun")}
DEFAULT_FLOW_ROWS = ("flow-euler:50,flow-euler:25,flow-euler:10,flow-heun:25,flow-heun:10,flow-heun:5,"
                     "flow-dopri5:50,flow-sde-euler:250,flow-sde-euler:50,flow-sde-euler:25")


def parse_args(argv=None) -> argparse.Namespace:
    """The runner's flags; --rows parsed, --cfg-scale defaulted per mode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--rows", default=DEFAULT_ROWS, help="sampler:steps,... (steps = --num-sampling-steps)")
    a("--demo-dir", default=str(ROOT / "results" / "demo"), help="the demo's --out (reused if trained)")
    a("--flow-rows", default=DEFAULT_FLOW_ROWS, help=f"flow sampler:steps,... ({', '.join(FLOW_SAMPLERS)}); "
      "'' skips the flow model")
    a("--flow-demo-dir", default=str(ROOT / "results" / "demo-flow"),
      help="the flow demo's --out (python -m dit_fast.demo --objective flow; reused if trained)")
    a("--samples-per-class", type=int, default=50)
    a("--cfg-scale", type=float, default=None, help="default: the demo's (3.0) / sample.py's (4.0) with --xl-timing")
    a("--seeds", default="0,1", help="x_T / noise seeds; quality is reported per seed and averaged "
      "(the spread shows the Fréchet distance's sampling noise)")
    a("--threads", type=int, default=0, help="CPU threads; 0 = the demo's choice from the current load")
    a("--compile", action="store_true", help="compile the model call (time reported apart)")
    a("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    a("--xl-timing", action="store_true", help="DiT-XL/2 256x256 images/s per sampler (GPU), no quality")
    a("--model-ckpt", default=None, help="--xl-timing: a DiT-XL/2 checkpoint (default: random weights)")
    a("--timing-model", default="DiT-XL/2", help="--xl-timing: the model (smaller ones for a smoke run)")
    a("--batch", type=int, default=32, help="--xl-timing: images per batch")
    a("--out-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.rows = parse_rows(args.rows)
    args.flow_rows = parse_rows(args.flow_rows, FLOW_SAMPLERS)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.cfg_scale is None:
        args.cfg_scale = 4.0 if args.xl_timing else 3.0
    return args


def parse_rows(spec: str, names=None) -> list[tuple[str, int]]:
    """'ddpm:250,heun:10' -> [("ddpm", 250), ("heun", 10)]; ValueError naming the bad part.
    ``names``: the allowed sampler names (default: the diffusion samplers)."""
    from dit_fast.sampling import SAMPLERS

    SAMPLERS = tuple(names or SAMPLERS)
    rows = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = part.rpartition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--rows entry {part!r}: want sampler:steps with a sampler in {', '.join(SAMPLERS)}")
        rows.append((name, int(steps)))
    return rows


def scheduler_label(name: str) -> str:
    """What a sampler name maps to, for the table."""
    from dit_fast.sampling.solvers import SOLVERS

    if name in FLOW_SAMPLERS:
        mode, method = FLOW_SAMPLERS[name]
        if method == "dopri5":
            return "torchdiffeq dopri5 (atol 1e-6, rtol 1e-3) on SiT's ODE"
        return f"ours: SiT {mode} {method}" + (", diffusion form sigma, Mean last step" if mode == "SDE" else "")
    if name in SOLVERS:
        cls, extra = SOLVERS[name]
        settings = ", ".join(f"{k}={v}" for k, v in extra.items())
        return f"diffusers {cls}({settings + ', ' if settings else ''}timestep_spacing=trailing)"
    return {"ddpm": "ours: ADM ancestral, respaced", "ddim": "ours: ADM DDIM eta=0, respaced"}[name]


# --------------------------------------------------------------------------------------- quality
def demo_model(args, device: torch.device, objective: str = "diffusion"):
    """(EMA model, image size, run config) of the demo run in --demo-dir (--flow-demo-dir for the
    flow objective), training it first if there is none."""
    from dit_fast import demo
    from dit_fast.config import load_config

    out = Path(args.flow_demo_dir if objective == "flow" else args.demo_dir)
    runs = out / "train" / "runs"
    try:
        run_dir, ema = demo.find_run(runs)
    except FileNotFoundError:
        print(f"[samplers] no demo run under {runs}: training it once (python -m dit_fast.demo)")
        demo.main(["--out", str(out), "--threads", str(args.threads), "--objective", objective])
        run_dir, ema = demo.find_run(runs)
    print(f"[samplers] demo model: {ema}")
    cfg = load_config(run_dir / "config.json")
    return demo.load_ema_model(run_dir, ema, device), cfg.model.input_size, cfg


def make_sampler(model, name: str, steps: int, args, run_cfg=None):
    """The sampler of a table row: a diffusion sampler, or a flow one on the run's transport."""
    import dataclasses

    from dit_fast.diffusion import create_diffusion
    from dit_fast.sampling import build_sampler
    from dit_fast.transport import create_transport

    # One grey channel + learned variance: guide the noise channel only, as the demo does.
    common = dict(cfg_scale=args.cfg_scale, num_classes=10, precision=args.precision, guide_all_channels=True)
    if name not in FLOW_SAMPLERS:
        return build_sampler(model, create_diffusion(str(steps)), method=name, **common)
    mode, method = FLOW_SAMPLERS[name]
    options = {"diffusion_form": "sigma"} if mode == "SDE" else {}
    return build_sampler(model, create_transport(**dataclasses.asdict(run_cfg.transport)), method=mode.lower(),
                         sampling_method=method, num_steps=steps, **common, **options)


def quality_row(model, name: str, steps: int, zs: dict, labels, scorer, args, run_cfg=None) -> dict:
    """One sampler on the demo model, for every seed's x_T in ``zs``: accuracy and Fréchet distance
    (mean and per seed), NFE, seconds (mean over the seeds; compilation apart)."""
    from dit_fast.sampling.images import to_uint8_hwc
    from dit_fast.sampling import timed

    sampler = make_sampler(model, name, steps, args, run_cfg)
    compile_s = sampler.compile(next(iter(zs.values())).shape) if args.compile else 0.0
    accuracy, frechet, seconds, nfes = [], [], [], []
    for seed, z in zs.items():
        g = torch.Generator(z.device).manual_seed(seed + 1000)  # DDPM's / the SDE's per-step noise
        samples, sec = timed(lambda: sampler.sample(z, labels, generator=g), z.device)
        metrics = scorer.score(to_uint8_hwc(samples.clamp(-1, 1).cpu()), labels.cpu().numpy())
        accuracy.append(metrics["accuracy"])
        frechet.append(metrics["frechet_distance"])
        seconds.append(sec)
        nfes.append(sampler.num_model_evaluations)  # an adaptive solver's count may vary per seed
    nfe = round(sum(nfes) / len(nfes))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"sampler": name, "steps": steps, "nfe": nfe, "accuracy": mean(accuracy),
            "frechet_distance": mean(frechet), "accuracy_per_seed": accuracy,
            "frechet_distance_per_seed": frechet, "sample_seconds": mean(seconds),
            "ms_per_nfe": 1e3 * mean(seconds) / nfe, "compile_seconds": compile_s,
            "scheduler": scheduler_label(name), "_reference": metrics}


def run_quality(args, device) -> tuple[list[dict], dict]:
    """Every --rows sampler on the demo model, same x_T and labels: (rows, metadata extras)."""
    from dit_fast import demo
    from dit_fast.scoring import DigitScorer

    threads = demo.pick_threads(args.threads)
    torch.set_num_threads(threads)
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    rows, scorer, models = [], None, []
    for objective, specs in (("diffusion", args.rows), ("flow", args.flow_rows)):
        if specs:
            model, size, run_cfg = demo_model(args, device, objective)
            scorer = scorer or DigitScorer(size, seed=0)
            models.append(f"{objective}: {run_cfg.train.results_dir}")
            zs = {seed: torch.randn(len(labels), model.in_channels, size, size,
                                    generator=torch.Generator().manual_seed(seed)).to(device) for seed in args.seeds}
            for name, steps in specs:
                rows.append(_timed_row(model, name, steps, zs, labels.to(device), scorer, args, run_cfg))
    ref = rows[0].pop("_reference") if rows else {}
    for r in rows:
        r.pop("_reference", None)
    extra = {"model": "digits demo DiT (" + "; ".join(models) + ")", "num_samples": len(labels), "threads": threads,
             "frechet_distance_real_subset": ref.get("frechet_distance_real_subset"),
             "classifier_heldout_accuracy": ref.get("classifier_heldout_accuracy"),
             "frechet_features": ref.get("frechet_features")}
    return rows, extra


def _timed_row(model, name, steps, zs, labels, scorer, args, run_cfg) -> dict:
    """quality_row, printed as it finishes."""
    with torch.no_grad():
        r = quality_row(model, name, steps, zs, labels, scorer, args, run_cfg)
    print(f"[samplers] {name:>14} {steps:>4} steps  NFE {r['nfe']:>4}  acc {r['accuracy']:.3f}  FD "
          f"{r['frechet_distance']:7.3f} ({', '.join(f'{v:.2f}' for v in r['frechet_distance_per_seed'])})"
          f"  {r['sample_seconds']:6.1f} s")
    return r


# --------------------------------------------------------------------------------------- XL speed
def run_xl_timing(args, device) -> tuple[list[dict], dict]:
    """--timing-model (DiT-XL/2) 256x256 images/s per sampler (random weights unless --model-ckpt)."""
    from dit_fast.checkpoint import load_into_model, load_state_dict
    from dit_fast.diffusion import create_diffusion
    from dit_fast.models import DiT_models
    from dit_fast.sampling import build_sampler, timed

    model = DiT_models[args.timing_model](input_size=32).to(device).eval()
    if args.model_ckpt:
        load_into_model(model, load_state_dict(args.model_ckpt))
    g = torch.Generator(device).manual_seed(args.seeds[0])
    z = torch.randn(args.batch, model.in_channels, 32, 32, generator=g, device=device)
    labels = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
    rows = []
    for name, steps in args.rows:
        sampler = build_sampler(model, create_diffusion(str(steps)), method=name, cfg_scale=args.cfg_scale,
                          num_classes=1000, precision=args.precision)
        compile_s = sampler.compile(z.shape) if args.compile else 0.0
        with torch.no_grad():
            _, seconds = timed(lambda: sampler.sample(z, labels), device)
        nfe = sampler.num_model_evaluations
        rows.append({"sampler": name, "steps": steps, "nfe": nfe, "images_per_s": args.batch / seconds,
                     "sample_seconds": seconds, "ms_per_nfe": 1e3 * seconds / nfe,
                     "compile_seconds": compile_s, "scheduler": scheduler_label(name)})
        print(f"[samplers] {name:>12} {steps:>4} steps  NFE {nfe:>4}  {args.batch / seconds:8.2f} img/s")
    return rows, {"model": f"{args.timing_model} 256x256" + (f" ({args.model_ckpt})" if args.model_ckpt else
                                                 " (random weights: speed only)"), "batch": args.batch}


# --------------------------------------------------------------------------------------- output
def metadata(args, device, extra: dict) -> dict:
    """Machine, versions, commit, date and the run's settings."""
    now = dt.datetime.now(dt.timezone.utc)
    return {"device": report.device_name(device), "torch": torch.__version__,
            "diffusers": report._version("diffusers"), "commit": report._git_commit(),
            "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "cfg_scale": args.cfg_scale,
            "precision": args.precision, "compile": args.compile, "seeds": args.seeds, **extra}


def markdown(rows: list[dict], meta: dict, xl: bool) -> str:
    """The table as markdown, with a header naming the machine and the reference numbers."""
    head = [f"## Samplers: {meta['model']}", "",
            f"device: {meta['device']}; torch {meta['torch']}, diffusers {meta['diffusers']}; commit "
            f"{meta['commit']}; {meta['date']}; cfg scale {meta['cfg_scale']}, {meta['precision']}"
            f"{', compiled' if meta['compile'] else ', eager'}; seconds exclude compilation.", ""]
    if not xl:
        head += [f"{meta['num_samples']} samples per seed (seeds {meta['seeds']}: the same x_T and labels for "
                 f"every row); accuracy and Fréchet distance are the seeds' mean, the Fréchet distance per seed "
                 f"in brackets; Fréchet distance over the "
                 f"{meta['frechet_features']}; for reference, real held-out digits score "
                 f"{meta['frechet_distance_real_subset']:.2f} and the classifier's own held-out accuracy is "
                 f"{meta['classifier_heldout_accuracy']:.1%}.", ""]
        cols = "| sampler | steps | NFE | class accuracy | Fréchet distance | sample s | ms / NFE | maps to |"
    else:
        cols = "| sampler | steps | NFE | images/s | sample s | ms / NFE | maps to |"
    lines = head + [cols, "|---|--:|--:|" + ("--:|" * (3 if xl else 4)) + "---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.2f}" for v in r.get("frechet_distance_per_seed", []))
        quality = "" if xl else f"{r['accuracy']:.1%} | {r['frechet_distance']:.2f} ({per_seed}) | "
        speed = f"{r['images_per_s']:.2f} | " if xl else ""
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {quality}{speed}"
                     f"{r['sample_seconds']:.2f} | {r['ms_per_nfe']:.1f} | {r['scheduler']} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], meta: dict, args, device) -> list[Path]:
    """samplers-<kind>-<device>-<date>.{md,json,png} in --out-dir, each written atomically."""
    from dit_fast.atomic import atomic_write_text

    kind = "xl" if args.xl_timing else "digits"
    stem = f"samplers-{kind}-{report.device_slug(device)}-{meta['date'][:10]}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"]
    atomic_write_text(paths[0], markdown(rows, meta, args.xl_timing))
    atomic_write_text(paths[1], json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    metric = ("images_per_s", "images/s") if args.xl_timing else None
    sampler_plot.save_plot(rows, meta, paths[2], speed_metric=metric)
    return paths


def main(argv=None) -> int:
    """Run the table (quality on the demo model, or --xl-timing) and write it."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, extra = run_xl_timing(args, device) if args.xl_timing else run_quality(args, device)
    paths = write_outputs(rows, metadata(args, device, extra), args, device)
    print("[samplers] wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
