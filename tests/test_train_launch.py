"""train.py through the real DeepSpeed launcher: 2 CPU ranks (gloo), ZeRO-2 and ZeRO-3, bf16.

`deepspeed --num_gpus 2` gives two ranks on DeepSpeed's CPU accelerator (the launcher trusts
--num_gpus for the slot count). The first launch on a machine builds DeepSpeed's small shm
communication op (~1.5 min, cached in ~/.cache/torch_extensions); later launches take ~15-60 s.

Checked: a ZeRO-3 run resumed from a checkpoint reproduces the uninterrupted run's per-step losses
exactly; the EMA export loads the way DiT's sample.py and dit_fast load it; a NaN loss stops a plain
`python train.py` run naming the step, the last good checkpoint intact. Kills, hangs and NaNs on one
rank under the launcher are tests/test_train_faults.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_fast.distributed import cpu_allreduce_segments, free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
        "--image-size", "8", "--num-classes", "10", "--vae", "none", "--num-workers", "0",
        "--global-batch-size", "32", "--lr", "2e-3", "--log-every", "1", "--precision", "bf16"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from dit_fast.data import write_digits_features
    return write_digits_features(tmp_path_factory.mktemp("digits") / "feat8", 8)


@pytest.fixture(scope="module")
def photo_latents(tmp_path_factory):
    """Real photos (scikit-learn's two) -> 24 crops in 2 classes -> extract_features.py with a tiny
    AutoencoderKL (downsample 2, 4 channels) standing in for the SD VAE -> (4, 8, 8) latents."""
    datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("diffusers")
    from PIL import Image

    from dit_fast.data import extract_cli as extract_features
    from tests.vae_helpers import save_tiny_vae
    tmp = tmp_path_factory.mktemp("photos")
    for name, photo in zip(("china", "flower"), datasets.load_sample_images().images):
        (tmp / "images" / name).mkdir(parents=True)
        for i in range(12):
            y, x = 20 * i, 30 * i
            Image.fromarray(photo[y:y + 160, x:x + 200]).resize((40, 32)).save(
                tmp / "images" / name / f"{i}.png")
    vae_dir = save_tiny_vae(tmp / "tiny_vae")
    argv = ["--data-path", str(tmp / "images"), "--features-path", str(tmp / "latents"),
            "--vae", str(vae_dir), "--image-size", "16", "--num-workers", "0"]
    assert extract_features.main(argv) == 0
    return tmp / "latents", tmp / "images", vae_dir



def _clean_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "CUDA_VISIBLE_DEVICES", "DIT_FAST_FAULT")}
    # DeepSpeed's CPU accelerator even on a GPU machine: 2 gloo ranks, bit-exact on any host.
    env.update({"DS_ACCELERATOR": "cpu"}, **(extra or {}))
    return env


def launch_command(args, port: int, script: str = "train.py") -> list[str]:
    """`deepspeed --num_gpus 2 --master_port PORT SCRIPT TINY ARGS` (train.py or another script)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return cmd + ["--num_gpus", "2", "--master_port", str(port), script, *TINY, *args]


def launch(args, env=None, timeout=420, script="train.py") -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 train.py ARGS` (or another script) from the repo root."""
    port = free_port()
    proc = subprocess.run(launch_command(args, port, script), cwd=ROOT, env=_clean_env(env),
                          capture_output=True, text=True, timeout=timeout)
    # Every rank unlinks its /dev/shm all-reduce segment right after init (they used to pile up in RAM).
    assert not cpu_allreduce_segments(port), f"launch on port {port} left {cpu_allreduce_segments(port)}"
    return proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_dir_of(results: Path) -> Path:
    runs = sorted(results.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) in log order, full precision, from metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def check_ema_export(ckpt: Path, step: int, in_channels=1, num_classes=10) -> None:
    from dit_fast.checkpoint import load_state_dict
    from dit_fast.models import DiT
    path = ckpt / f"ema-{step:07d}.pt"
    state = torch.load(path, map_location="cpu")["ema"]  # what DiT's sample.py does
    model = DiT(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=64, depth=2,
                num_heads=4, num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    assert load_state_dict(str(path)).keys() == state.keys()
    assert all(torch.isfinite(v).all() for v in state.values())


def test_zero3_stop_resume_exact_on_vae_latents_of_real_photos(tmp_path, photo_latents):
    latents, _, vae_dir = photo_latents
    common = ["--features-path", str(latents), "--vae", str(vae_dir), "--image-size", "16",
              "--num-classes", "2", "--global-batch-size", "8", "--deepspeed_config",
              str(ROOT / "configs/deepspeed/zero3.json"), "--results-dir", str(tmp_path),
              "--ckpt-every", "3", "--keep-last", "0", "--ema-decay", "0"]
    ok(launch([*common, "--max-steps", "6"]))  # stops at 6 (final save), via --max-steps
    run = run_dir_of(tmp_path)
    ref = losses(run)
    assert [s for s, _ in ref] == [1, 2, 3, 4, 5, 6]
    ok(launch([*common, "--max-steps", "6", "--resume", str(run / "checkpoints" / "step-0000003")]))
    # metrics.jsonl was cut back to step 3 on resume; steps 4..6 again, bit-identical
    assert losses(run) == ref
    check_ema_export(run / "checkpoints" / "step-0000006", 6, in_channels=4, num_classes=2)
    # With decay 0 the EMA is the fp32 master weights: the ZeRO-3 gathers must reassemble exactly what
    # DeepSpeed's own consolidation gives. The frozen pos_embed has no master: the consolidation holds
    # the bf16 module copy, the EMA its exact fp32 init, which rounds to it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run / "checkpoints" / "step-0000006"
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    ema = torch.load(ckpt / "ema-0000006.pt", weights_only=True)["ema"]
    for name, value in master.items():
        mine = ema[name].to(value.dtype) if name == "pos_embed" else ema[name]
        torch.testing.assert_close(mine, value, rtol=0, atol=0, check_dtype=False, msg=name)
    log = (run / "log.txt").read_text()
    assert "(step=0000006) Train Loss: " in log and "Train Steps/Sec: " in log


def test_raw_images_through_the_vae_plain_python(tmp_path, photo_latents):
    _, images, vae_dir = photo_latents
    args = [*TINY, "--data-path", str(images), "--vae", str(vae_dir), "--image-size", "16",
            "--num-classes", "2", "--global-batch-size", "4", "--results-dir", str(tmp_path),
            "--max-steps", "2", "--ckpt-every", "2"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    ok(proc)
    assert "(step=0000002) Train Loss:" in (run_dir_of(tmp_path) / "log.txt").read_text()
    check_ema_export(run_dir_of(tmp_path) / "checkpoints" / "step-0000002", 2, in_channels=4,
                     num_classes=2)


def test_nan_loss_stops_plain_python_run_keeping_last_good_checkpoint(tmp_path, digits8):
    # An absurd learning rate makes step 2's loss inf/NaN in fp32.
    args = [*TINY, "--features-path", str(digits8), "--results-dir", str(tmp_path),
            "--precision", "fp32", "--lr", "1e30", "--ckpt-every", "1", "--max-steps", "5"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "non-finite loss (NaN/inf) at step 2" in proc.stderr
    ckpts = run_dir_of(tmp_path) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001"]
    check_ema_export(ckpts / "step-0000001", 1)

