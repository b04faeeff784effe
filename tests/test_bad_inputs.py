"""Bad input on every entry point: one line on stderr (`<prog>: error: ...`), exit code 2, no
traceback, and nothing created (the folder listing before == after; no process group joined).

The table runs the entry points in-process (their `main(argv)`, exactly what `python train.py` runs
after argv) to stay cheap; a few rows also go through a real subprocess to prove the exit code
and the absence of a traceback end to end.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
        "--image-size", "8", "--num-classes", "10", "--vae", "none", "--num-workers", "0",
        "--global-batch-size", "32", "--max-steps", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the bad command lines point at (outside the folder whose listing is checked)."""
    from dit_fast.data import write_digits_features
    base = tmp_path_factory.mktemp("inputs")
    feat = write_digits_features(base / "feat8", 8)
    (base / "empty").mkdir()
    (base / "notes.txt").write_text("not a checkpoint, not a folder\n")
    (base / "bad.json").write_text("{\"zero_optimization\": {\"stage\": 2},,}")
    (base / "contra.json").write_text(json.dumps({"train_batch_size": 7}))
    (base / "optim.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    (base / "fp16on.json").write_text(json.dumps({"fp16": {"enabled": True}}))
    (base / "list.json").write_text("[1, 2]")
    (base / "stage4.json").write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    write_digits_features(base / "feat12", 12)
    write_digits_features(base / "feat16", 16)  # REPA's sizes, but no images beside the latents
    nostats = write_digits_features(base / "nostats", 8)  # an index that claims per-channel stats
    index = json.loads((nostats / "index.json").read_text())
    (nostats / "index.json").write_text(json.dumps({**index, "latent_norm": {"mode": "channel"}}))
    (base / "images" / "cat").mkdir(parents=True)
    (base / "junk.pt").write_bytes(b"junk bytes, not a torch file" * 4)
    torch.save({"pos_embed": torch.zeros(3)}, base / "wrong_shape.pt")
    from tests.sampling_helpers import build_tiny, save_tiny_checkpoint
    save_tiny_checkpoint(base / "tiny.pt", input_size=8, in_channels=3, num_classes=10)
    torch.save(build_tiny(input_size=8, in_channels=3, num_classes=10, class_dropout_prob=0.0)
               .state_dict(), base / "no_null.pt")
    (base / "outdir").mkdir()
    # evaluation references: 5 images (enough), 3 (too few for precision/recall)
    np.savez(base / "ref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez(base / "ref3.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    ckpt = base / "run" / "checkpoints" / "step-0000004.tmp"
    ckpt.mkdir(parents=True)
    return {"feat": str(feat), "empty": str(base / "empty"), "txt": str(base / "notes.txt"),
            "base": base, "ckpt_tmp": str(ckpt), "images": str(base / "images"),
            "junk": str(base / "junk.pt"), "wrong": str(base / "wrong_shape.pt"),
            "tiny": str(base / "tiny.pt"), "no_null": str(base / "no_null.pt"),
            "outdir": str(base / "outdir"), "nostats": str(nostats), "ref": str(base / "ref.npz"),
            "ref3": str(base / "ref3.npz")}


def train_main(argv):
    from dit_fast.train.cli import main
    return main(argv)


def extract_main(argv):
    from dit_fast.data.extract_cli import main
    return main(argv)


def sample_main(argv):
    from dit_fast.sampling import grid as sample
    return sample.cli(argv)


def sample_ddp_main(argv):
    from dit_fast.sampling import fid_set as sample_ddp
    return sample_ddp.cli(argv)


def export_main(argv):
    from dit_fast.checkpoint.export import cli
    return cli(argv)


def demo_main(argv):
    from dit_fast import demo
    return demo.cli(argv)


SAMPLE_TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
               "--vae", "none", "--image-size", "8", "--num-classes", "10",
               "--num-sampling-steps", "2", "--device", "cpu"]


def S(*extra, ckpt="{tiny}", labels=()):
    """A sample.py / sample_ddp.py command line on the tiny checkpoint, writing into the cwd."""
    return lambda f: [*SAMPLE_TINY, *labels, *(["--ckpt", ckpt.format(**f)] if ckpt else []),
                      *[a.format(**f) for a in extra]]


def SP(*extra, ckpt="{tiny}"):
    """sample.py: two labels inside the tiny model's 10 classes."""
    return S(*extra, ckpt=ckpt, labels=("--class-labels", "1", "2"))


def T(*extra, feat=True):
    """A train.py command line: the tiny model, plus --features-path unless told otherwise."""
    return lambda f: [*TINY, *(["--features-path", f["feat"]] if feat else []), "--results-dir",
                      "results", *[a.format(**f) for a in extra]]


def E(*args):
    return lambda f: [a.format(**f) for a in args]


TRAIN_CASES = [
    ("features path missing", T("--features-path", "{base}/nope"), "does not exist"),
    ("features path is a file", T("--features-path", "{txt}"), ""),
    ("features path empty dir", T("--features-path", "{empty}"), "is empty"),
    ("no data flag", T(feat=False), "exactly one of --features-path"),
    ("both data flags", T("--data-path", "{images}"), "exactly one of --features-path"),
    ("data path is a file", T("--data-path", "{txt}", feat=False), "not a directory"),
    ("data path has no images", T("--data-path", "{images}", feat=False), ""),
    ("unknown model", T("--model", "DiT-Q/3"), "unknown model"),
    ("unknown attention backend", T("--attn-backend", "flashy"), "unknown attention backend"),
    ("unavailable attention backend", T("--attn-backend", "xformers"), "unavailable"),
    ("zero batch", T("--global-batch-size", "0"), "--global-batch-size must be positive"),
    ("negative batch", T("--global-batch-size", "-32"), "--global-batch-size must be positive"),
    ("batch not an int", T("--global-batch-size", "lots"), "invalid int value"),
    ("batch not divisible by accumulation", T("--grad-accum", "3"), "not divisible"),
    ("zero accumulation", T("--grad-accum", "0"), "--grad-accum must be positive"),
    ("batch larger than the data", T("--global-batch-size", "4096"), "fewer than one optimizer step"),
    ("image size off the latents", T("--image-size", "16"), "pass --image-size 8"),
    ("negative image size", T("--image-size", "-8"), "--image-size must be positive"),
    ("zero classes", T("--num-classes", "0"), "--num-classes must be positive"),
    ("labels out of range", T("--num-classes", "5"), ""),
    ("deepspeed json missing", T("--deepspeed_config", "{base}/nope.json"), "does not exist"),
    ("deepspeed json invalid", T("--deepspeed_config", "{base}/bad.json"), "not valid JSON"),
    ("deepspeed json contradicts", T("--deepspeed_config", "{base}/contra.json"), "contradicts"),
    ("deepspeed json optimizer", T("--deepspeed_config", "{base}/optim.json"), "optimizer"),
    ("deepspeed json fp16 vs bf16", T("--deepspeed_config", "{base}/fp16on.json"), "contradicts"),
    ("fp16 on a CPU", T("--precision", "fp16"), "needs a GPU"),
    ("unknown precision", T("--precision", "fp8"), "invalid choice"),
    ("resume path missing", T("--resume", "{base}/nope"), "not a complete checkpoint"),
    ("resume an unfinished save", T("--resume", "{ckpt_tmp}"), "unfinished save"),
    ("resume a file", T("--resume", "{txt}"), "not a complete checkpoint"),
    ("results dir is a file", T("--results-dir", "{txt}"), "is a file"),
    ("checkpointing fraction > 1", T("--grad-checkpointing", "2"), "fraction"),
    ("negative lr", T("--lr=-1e-4"), "--lr must be positive"),
    ("init-from missing", T("--init-from", "{base}/nope.pt"), "No checkpoint"),
    ("init-from unreadable", T("--init-from", "{junk}"), "not a torch checkpoint"),
    ("init-from another width", T("--init-from", "{tiny}"),
     "x_embedder.proj.weight is (32, 3, 2, 2) in the checkpoint but (64, 1, 2, 2) in this model"),
    ("init-from a run without a checkpoint", T("--init-from", "{base}/run"), "no complete checkpoint"),
    ("keep-labels without init-from", T("--keep-labels"), "--keep-labels needs --init-from"),
    ("eval without a reference", T("--eval-every", "2"), "needs --eval-ref"),
    ("eval reference missing", T("--eval-every", "2", "--eval-ref", "{base}/nope.npz"), "--eval-ref: no such file"),
    ("eval reference of 3 images", T("--eval-every", "2", "--eval-ref", "{ref3}"), "has 3 images"),
    ("eval without inception weights", T("--eval-every", "2", "--eval-ref", "{ref}", "--inception-weights",
                                         "{base}/no.pth"), "Inception weights not found"),
    ("eval with 3 samples", T("--eval-every", "2", "--eval-ref", "{ref}", "--eval-samples", "3"),
     "--eval-samples must be >= 4"),
    ("eval with an unknown sampler", T("--eval-every", "2", "--eval-ref", "{ref}", "--eval-sampler", "rk4"),
     "--eval-sampler 'rk4'"),
    ("eval with guidance below 1", T("--eval-every", "2", "--eval-ref", "{ref}", "--eval-cfg-scale", "0.5"),
     "--eval-cfg-scale must be >= 1.0"),
    ("eval with zero steps", T("--eval-every", "2", "--eval-ref", "{ref}", "--eval-steps", "0"),
     "--eval-steps must be positive"),
    ("negative eval interval", T("--eval-every", "-1"), "--eval-every must be >= 0"),
    ("eval reference without --eval-every", T("--eval-ref", "{ref}"), "options of --eval-every"),
    ("zero collective timeout", T("--collective-timeout", "0"), "--collective-timeout"),
    ("EMA decay above 1", T("--ema-decay", "1.5"), "--ema-decay"),
    ("width not divisible by heads", T("--hidden-size", "60", "--num-heads", "7"), "divisible"),
    ("zero max steps", T("--max-steps", "0"), "--max-steps must be positive"),
    ("negative workers", T("--num-workers", "-1"), "--num-workers"),
    ("unknown flag", T("--learning-rate", "1"), "unrecognized arguments"),
    ("negative seed", T("--global-seed", "-1"), "--global-seed must be >= 0"),
    ("deepspeed json is a list", T("--deepspeed_config", "{base}/list.json"), "not an object"),
    ("deepspeed json zero stage 4", T("--deepspeed_config", "{base}/stage4.json"), "stage must be"),
    ("latent size not divisible by the patch", T("--model", "DiT-S/8", "--features-path",
                                                 "{base}/feat12", "--image-size", "12"), "patch size 8"),
    ("unknown objective", T("--objective", "score"), "--objective must be one of"),
    ("unknown flow path", T("--objective", "flow", "--path-type", "Cosine"), "--path-type must be one of"),
    ("unknown flow prediction", T("--objective", "flow", "--prediction", "x0"), "--prediction must be one of"),
    ("unknown flow loss weight", T("--objective", "flow", "--loss-weight", "huber"), "--loss-weight must be"),
    ("flow train eps out of range", T("--objective", "flow", "--train-eps", "0.7"), "--train-eps"),
    ("repa image size off DINOv2's grid", T("--repa"), "must be a multiple of 16"),
    ("repa unknown encoder type", T("--repa", "--enc-type", "clip-vit-b"), "--enc-type must be"),
    ("repa gets SiT's path name", T("--repa", "--path-type", "GVP"), "(REPA's)"),
    ("repa unknown weighting", T("--repa", "--weighting", "beta"), "--weighting must be one of"),
    ("repa negative coefficient", T("--repa", "--proj-coeff", "-1"), "--proj-coeff must be >= 0"),
    ("repa flags without --repa", T("--encoder-depth", "4"), "REPA's flags need --repa"),
    ("repa on latents without images", T("--repa", "--features-path", "{base}/feat16", "--image-size", "16"),
     "extract_features.py --keep-images"),
    ("index claims channel stats it lacks", T("--features-path", "{nostats}"), "per-channel mean and std"),
]

EXTRACT_CASES = [
    ("data path missing", E("--data-path", "{base}/nope", "--features-path", "out"), "does not exist"),
    ("data path is a file", E("--data-path", "{txt}", "--features-path", "out"), "not a directory"),
    ("no images", E("--data-path", "{images}", "--features-path", "out", "--vae", "none"), ""),
    ("features path is a file", E("--data-path", "{images}", "--features-path", "{txt}"), "is a file"),
    ("zero image size", E("--data-path", "{images}", "--features-path", "out", "--image-size", "0"),
     "--image-size must be positive"),
    ("image size not divisible", E("--data-path", "{images}", "--features-path", "out",
                                   "--image-size", "12"), "divisible"),
    ("unknown vae", E("--data-path", "{images}", "--features-path", "out", "--vae", "/no/vae"),
     "--vae"),
    ("grayscale with a VAE", E("--data-path", "{images}", "--features-path", "out", "--grayscale"),
     "--grayscale"),
    ("missing flag", E("--data-path", "{images}"), "required"),
    ("negative batch", E("--data-path", "{images}", "--features-path", "out", "--batch-size", "-1"),
     "--batch-size must be positive"),
    ("negative seed", E("--data-path", "{images}", "--features-path", "out", "--global-seed", "-3"),
     "--global-seed must be >= 0"),
    ("unknown latent norm", E("--data-path", "{images}", "--features-path", "out", "--latent-norm",
                              "bogus"), "invalid choice"),
    ("channel norm in pixel space", E("--data-path", "{images}", "--features-path", "out", "--vae", "none",
                                      "--latent-norm", "channel"), "--latent-norm channel"),
]

SAMPLE_CASES = [
    ("checkpoint missing", SP(ckpt="{base}/nope.pt"), "No checkpoint"),
    ("checkpoint unreadable", SP(ckpt="{junk}"), "not a torch checkpoint"),
    ("checkpoint of another shape", SP(ckpt="{wrong}"), "does not fit"),
    ("checkpoint is a folder", SP(ckpt="{empty}"), ""),
    ("label out of range", SP("--class-labels", "10"), "outside [0, 9]"),
    ("zero classes", SP("--num-classes", "0"), "--num-classes must be positive"),
    ("size not divisible by the patch", SP("--image-size", "7"), "divisible"),
    ("negative size", SP("--image-size", "-8"), "--image-size must be positive"),
    ("unknown model", SP("--model", "DiT-Z/2"), "invalid choice"),
    ("unknown vae", SP("--vae", "/no/such/vae"), "--vae"),
    ("out is a folder", SP("--out", "{outdir}"), "is a directory"),
    ("zero sampling steps", SP("--num-sampling-steps", "0"), "--num-sampling-steps must be positive"),
    ("unknown precision", SP("--precision", "fp8"), "invalid choice"),
    ("unknown sampler", SP("--sampler", "rk4"), "invalid choice"),
    ("unknown attention backend", SP("--attn-backend", "flashy"), "unknown attention backend"),
    ("official checkpoint, other model", SP(ckpt=None), "without --ckpt"),
    ("guidance without a null label", SP(ckpt="{no_null}"), "no null label"),
    ("SiT flag on a diffusion model", SP("--mode", "SDE"), "apply to flow models"),
    ("transport flag without --objective flow", SP("--path-type", "GVP"), "add --objective flow"),
    ("diffusion sampler on a flow model", SP("--objective", "flow", "--sampler", "ddim"),
     "is a diffusion sampler"),
    ("unknown flow mode", SP("--objective", "flow", "--mode", "PDE"), "invalid choice"),
    ("unknown SDE method", SP("--objective", "flow", "--mode", "SDE", "--sampling-method", "RK4"),
     "not an SDE method"),
    ("unknown diffusion form", SP("--objective", "flow", "--mode", "SDE", "--diffusion-form", "cubic"),
     "--diffusion-form must be one of"),
    ("unknown ODE solver", SP("--objective", "flow", "--sampling-method", "rk99"), "not an ODE solver"),
    ("flow model without --ckpt", SP("--objective", "flow", ckpt=None), "needs --ckpt"),
    ("REPA model without --ckpt", SP("--objective", "repa", ckpt=None), "needs --ckpt"),
    ("SiT sampler flag on a REPA model", SP("--objective", "repa", "--diffusion-form", "sigma"),
     "do not apply to a REPA model"),
    ("SiT path on a REPA model", SP("--objective", "repa", "--path-type", "GVP"), "REPA's paths"),
    ("Heun on REPA's SDE", SP("--objective", "repa", "--sampling-method", "heun"), "REPA's ODE sampler takes"),
    ("empty guidance interval", SP("--cfg-interval", "800", "200"), "LOW <= HIGH"),
]
SAMPLE_DDP_CASES = [
    ("guidance scale below 1", S("--cfg-scale", "0.5"), "--cfg-scale must be >= 1.0"),
    ("zero batch", S("--per-proc-batch-size", "0"), "must be >= 1"),
    ("zero samples", S("--num-fid-samples", "0"), "must be >= 1"),
    ("sample dir is a file", S("--sample-dir", "{txt}"), "is a file"),
    ("evaluate reference missing", S("--evaluate", "{base}/nope.npz"), "--evaluate: no such file"),
    ("evaluate reference not an npz", S("--evaluate", "{txt}"), "not an .npz"),
    ("evaluate with too few samples", S("--evaluate", "{ref}", "--num-fid-samples", "3"), "--num-fid-samples >= 4"),
    ("evaluate without inception weights", S("--evaluate", "{ref}", "--inception-weights", "{base}/no.pth"),
     "Inception weights not found"),
    ("inception weights without evaluate", S("--inception-weights", "{base}/no.pth"), "option of --evaluate"),
    ("checkpoint missing", S(ckpt="{base}/nope.pt"), "No checkpoint"),
    ("grey images for the npz", S("--in-channels", "1"), "RGB"),
    ("batch not an int", S("--per-proc-batch-size", "x"), "invalid int value"),
    ("negative seed", S("--global-seed", "-1"), "--global-seed must be >= 0"),
    # Each of these used to fail after sample_ddp.json was written, so the corrected rerun was refused.
    ("unknown device", S("--device", "bogus"), "--device bogus"),
    ("unknown compile mode", S("--compile", "--compile-mode", "fastest"), "invalid choice"),
    ("FlashAttention not installed", S("--device", "cpu", "--attn-backend", "flash_attn"),
     "'flash_attn' was asked for but is unavailable"),
] + ([] if torch.cuda.is_available() else [
    ("CUDA absent", S("--device", "cuda"), "CUDA is not available on this machine")])
EXPORT_TINY = SAMPLE_TINY[:-4]  # the tiny checkpoint's model flags, without the sampling ones
EXPORT_CASES = [
    ("checkpoint missing", E(*EXPORT_TINY, "--ckpt", "{base}/nope.pt", "--out", "x"), "No checkpoint"),
    ("checkpoint of another shape", E(*EXPORT_TINY, "--ckpt", "{wrong}", "--out", "x"), "does not fit"),
    ("out exists", E(*EXPORT_TINY, "--ckpt", "{tiny}", "--out", "{outdir}"), "--overwrite"),
    ("unknown scheduler", E(*EXPORT_TINY, "--ckpt", "{tiny}", "--out", "x", "--scheduler", "fast"),
     "invalid choice"),
]
DEMO_CASES = [
    ("size not divisible", E("--image-size", "9"), "divisible"),
    ("unknown model", E("--model", "DiT-S/3"), "invalid choice"),
    ("other classes", E("--num-classes", "3"), "the digits have 10 classes"),
    ("zero heads", E("--num-heads", "0"), "--num-heads must be positive"),
    ("out is a file", E("--out", "{txt}"), "is a file"),
    ("EMA decay 1", E("--ema-decay", "1"), "--ema-decay"),
    ("zero steps", E("--max-steps", "0"), "--max-steps must be positive"),
    ("lr not a number", E("--lr", "fast"), "invalid float value"),
]

CASES = ([("train.py", train_main, *c) for c in TRAIN_CASES]
         + [("extract_features.py", extract_main, *c) for c in EXTRACT_CASES]
         + [("sample.py", sample_main, *c) for c in SAMPLE_CASES]
         + [("sample_ddp.py", sample_ddp_main, *c) for c in SAMPLE_DDP_CASES]
         + [("export_diffusers.py", export_main, *c) for c in EXPORT_CASES]
         + [("dit_fast.demo", demo_main, *c) for c in DEMO_CASES])


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_in_process(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exit
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("prog, main, name, argv, expect", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_bad_input_one_line_exit_2_nothing_created(prog, main, name, argv, expect, files, tmp_path,
                                                   monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    before, inputs_before = listing(tmp_path), listing(files["base"])
    joined = dist.is_initialized()  # other tests in this process may have joined a group already
    code, err = run_in_process(main, argv(files), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, code, err)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert expect in lines[0], lines[0]
    assert listing(tmp_path) == before and listing(files["base"]) == inputs_before
    assert dist.is_initialized() == joined  # no process group was joined


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("train.py", ["--features-path", "{feat}", "--attn-backend", "flashy"]),
    ("train.py", ["--features-path", "{feat}", "--global-batch-size", "0"]),
    ("extract_features.py", ["--data-path", "{txt}", "--features-path", "out"]),
    ("sample.py", [*SAMPLE_TINY, "--ckpt", "{junk}"]),
    ("sample_ddp.py", [*SAMPLE_TINY, "--ckpt", "{tiny}", "--cfg-scale", "0.5"]),
    ("-m dit_fast.demo", ["--num-heads", "0"]),
])
def test_bad_input_through_a_real_process(script, args, files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    extra = TINY if script == "train.py" else []
    command = script.split() if script.startswith("-m") else [str(ROOT / script)]
    proc = subprocess.run([sys.executable, *command, *extra,
                           *[a.format(**files) for a in args]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    prog = script.split()[-1]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    assert listing(tmp_path) == []
