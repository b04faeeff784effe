"""train.py --repa: REPA's objective in the real training step, checkpoints, resume and sampling.

Data: 11 small images through extract_features.py --keep-images with a tiny AutoencoderKL (32 px ->
4 x 16 x 16 latents); encoder: a tiny random DINOv2 saved with save_pretrained (32 px -> 28 px input
-> 2 x 2 patch tokens, as many as DiT-S/8 makes of a 16 x 16 latent). Nothing is downloaded.

In process: the projector receives gradients and the encoder none, inside TrainStep. Two CPU ranks
(ZeRO-2, bf16) through the real launcher: a run killed mid-step and resumed reproduces the
uninterrupted run's losses, alignment losses and every checkpoint tensor (DiT, projector, their
optimizer state, EMA, RNG) bit for bit; under ZeRO-3 the same run keeps the losses (to bf16 noise) and
the EMA file; sample.py --ckpt RUN samples it with no sampling flag, and a
REPA-layout checkpoint file (DiT keys + projectors.* + args) gives the same images with the
projector dropped. Cost: four 4-step launches, ~12 s each on 2 cores.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from tests.test_repa_encoder import save_tiny  # noqa: E402
from tests.test_train_faults import COMMON, FAULT, assert_same_checkpoint, ckpt_names  # noqa: E402
from tests.test_train_launch import launch, losses, ok, run_dir_of  # noqa: E402
from tests.vae_helpers import save_tiny_vae  # noqa: E402

MODEL = ["--model", "DiT-S/8", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
         "--image-size", "32", "--num-classes", "3"]


@pytest.fixture(scope="module")
def repa_inputs(tmp_path_factory):
    """(features dir with images, tiny VAE dir, tiny encoder dir)."""
    from dit_fast.data import extract_cli as extract_features
    base = tmp_path_factory.mktemp("repa")
    rng = np.random.default_rng(0)
    for i in range(11):
        folder = base / "images" / ("cat", "dog", "eel")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
    vae = save_tiny_vae(base / "vae")
    encoder = save_tiny(base / "encoder")
    assert extract_features.main(["--data-path", str(base / "images"), "--features-path", str(base / "feat"),
                                  "--image-size", "32", "--vae", str(vae), "--keep-images", "--shard-size", "4",
                                  "--batch-size", "3", "--num-workers", "0"]) == 0
    return base / "feat", vae, encoder


def repa_cfg(feat, vae, encoder):
    from dit_fast.train import cli
    args = cli.build_parser().parse_args([
        *MODEL, "--features-path", str(feat), "--vae", str(vae), "--global-batch-size", "4", "--num-workers", "0",
        "--repa", "--encoder", str(encoder), "--encoder-depth", "1", "--projector-dim", "32", "--lr", "1e-2"])
    from dit_fast.config import config_from_args
    from dit_fast.train.loop import prepare
    cfg = config_from_args(args)
    assert cfg.train.objective == "repa" and cfg.model.learn_sigma is False
    resolved, ds_config, info, _ = prepare(cfg)
    return resolved, ds_config, info


def test_projector_gets_gradients_the_encoder_none_inside_the_step(repa_inputs):
    from dit_fast.distributed import init_distributed
    from dit_fast.train.data import build_loader
    from dit_fast.train.engine import build_engine
    from dit_fast.train.step import TrainStep
    cfg, ds_config, info = repa_cfg(*repa_inputs)
    ctx = init_distributed(use_deepspeed=True)
    engine, ema = build_engine(cfg, ds_config, ctx.device, 0, 1)
    step = TrainStep.from_config(cfg, engine, ema, ctx.device)
    module = engine.module
    assert type(module).__name__ == "REPAModel" and len(module.dit.blocks) == 2
    got = {}
    projector_names = [n for n, _ in module.named_parameters() if n.startswith("projectors.")]
    for name, p in module.named_parameters():
        if name in projector_names:
            p.register_hook(lambda g, name=name: got.__setitem__(name, g.float().abs().sum().item()))
    encoder = step.objective.encoder
    enc_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    proj_before = {k: v.float().clone() for k, v in module.projectors.state_dict().items()}
    loader, order = build_loader(info, cfg, 0, 1, ctx.device)
    order.set_epoch(0)
    x, y, images = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    step.optimizer_step(iter([(x, y, images)]))
    assert sorted(got) == sorted(projector_names) and all(v > 0 for v in got.values()), got
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(enc_before[k], v) for k, v in encoder.state_dict().items())
    assert any(not torch.equal(proj_before[k], v.float()) for k, v in module.projectors.state_dict().items())
    assert step.objective.extra_metrics(1)["proj_loss"] < 0        # -cosine, averaged
    engine.destroy()


@pytest.mark.slow
def test_two_rank_repa_run_killed_and_resumed_is_bit_exact_and_samples(tmp_path, repa_inputs, capsys):
    feat, vae, encoder = repa_inputs
    short = [*COMMON[:COMMON.index("--max-steps")], "--max-steps", "4", "--ckpt-every", "2",
             *COMMON[COMMON.index("--deepspeed_config"):]]
    args = [*short, *MODEL, "--features-path", str(feat), "--vae", str(vae), "--global-batch-size", "4",
            "--keep-last", "0", "--repa", "--encoder", str(encoder), "--encoder-depth", "1",
            "--projector-dim", "32", "--weighting", "lognormal"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ok(launch([*args, "--results-dir", str(ref_dir)]))
    reference = run_dir_of(ref_dir)
    log = (reference / "log.txt").read_text()
    assert "Projector Parameters: " in log
    assert all(", Proj Loss: " in line for line in log.splitlines() if "Train Loss: " in line)
    ref = losses(reference)
    ref_proj = proj_losses(reference)
    assert [s for s, _ in ref] == [1, 2, 3, 4] and all(p < 0 for p in ref_proj)
    saved = json.loads((reference / "config.json").read_text())
    assert saved["train"]["objective"] == "repa" and saved["repa"]["weighting"] == "lognormal"

    proc = launch([*args, "--results-dir", str(run_dir)], env={FAULT: "kill:step.mid:3"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    run = run_dir_of(run_dir)
    assert ckpt_names(run) == ["step-0000002"]
    ok(launch([*args, "--results-dir", str(run_dir), "--resume", "auto"]))
    assert losses(run) == ref and proj_losses(run) == ref_proj
    final = run / "checkpoints/step-0000004"
    assert_same_checkpoint(reference / "checkpoints/step-0000004", final)  # DiT, projector, optimizer, EMA, RNG

    ema_file = torch.load(final / "ema-0000004.pt", weights_only=True)
    assert not any(k.startswith(("projectors.", "dit.")) for k in ema_file["ema"])      # a plain SiT
    assert sorted(ema_file["ema_extra"]) == [f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")]
    check_zero3(args, tmp_path / "zero3", ref, ema_file)
    check_sampling(run, ema_file, tmp_path, capsys)


def check_zero3(args: list, results: Path, ref: list, ema_file: dict) -> None:
    """The same run under ZeRO-3 (DiT and projector partitioned; the tap and the encoder unchanged):
    the losses of ZeRO-2's reference to bf16 reduction-order noise, the same EMA file layout and
    values (the EMA follows the consolidated fp32 master)."""
    from tests.test_train_launch import ROOT
    at = args.index("--deepspeed_config") + 1
    zero3 = [*args[:at], str(ROOT / "configs/deepspeed/zero3.json"), *args[at + 1:]]
    ok(launch([*zero3, "--results-dir", str(results)]))
    run = run_dir_of(results)
    got = losses(run)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert all(abs(a - b) < 2e-3 for (_, a), (_, b) in zip(got, ref)), (got, ref)
    other = torch.load(run / "checkpoints/step-0000004/ema-0000004.pt", weights_only=True)
    for part in ("ema", "ema_extra"):
        assert other[part].keys() == ema_file[part].keys(), part
        for name, value in ema_file[part].items():
            torch.testing.assert_close(other[part][name], value, rtol=0, atol=1e-6, msg=f"{part} {name}")


def proj_losses(run: Path) -> list:
    return [r["proj_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def check_sampling(run: Path, ema_file: dict, tmp_path: Path, capsys) -> None:
    """sample.py --ckpt RUN with no sampling flag: REPA's SDE, 250 steps, 1.8 on [0, 0.7]; a REPA
    checkpoint file of the same weights (projectors.* beside the SiT keys, REPA's args) gives the
    same images, its projector dropped with one line."""
    from dit_fast.sampling.grid import main as sample_main
    labels = ["--class-labels", "0", "1", "2"]
    capsys.readouterr()
    from_run = sample_main(["--ckpt", str(run), *labels, "--out", str(tmp_path / "run.png")])
    printed = capsys.readouterr().out
    for line in ("sample.sampler = 'repa-sde'", "sample.num_sampling_steps = 250", "sample.cfg_scale = 1.8",
                 "sample.cfg_interval = (0.0, 0.7)", "sample.repa_path_type = 'linear'"):
        assert line in printed
    assert torch.isfinite(from_run["images"]).all()
    repa_layout = {"ema": {**ema_file["ema"], **ema_file["ema_extra"]}, "steps": 4,
                   "args": argparse.Namespace(encoder_depth=1, projector_embed_dims="24")}
    torch.save(repa_layout, tmp_path / "repa.pt")
    config = json.loads((run / "config.json").read_text())
    from_file = sample_main(["--ckpt", str(tmp_path / "repa.pt"), "--objective", "repa", *MODEL,
                             "--vae", config["data"]["vae"], *labels, "--out", str(tmp_path / "file.png")])
    assert "Dropped 6 REPA projector tensors" in capsys.readouterr().out
    torch.testing.assert_close(from_file["images"], from_run["images"], rtol=0, atol=0)


def test_image_folder_training_hands_repa_the_crop_of_its_own_pixels(repa_inputs):
    """--data-path with --repa: each item's uint8 image is the crop (and flip of that epoch) the
    model's pixels were made from, one file read for both."""
    from dit_fast.data import ImageFolder, pixels_to_tensor
    from dit_fast.train.data import EpochKeyedWithImages
    folder = ImageFolder(Path(repa_inputs[0]).parent / "images", 32, random_flip=True, seed=3)
    view = EpochKeyedWithImages(folder)
    flipped = 0
    for epoch in (0, 1):
        for i in range(len(folder)):
            x, label, image = view[(i, epoch)]
            folder.set_epoch(epoch)
            want_x, want_label = folder[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
            assert torch.equal(x, want_x) and label == want_label
            assert torch.equal(pixels_to_tensor(image.permute(1, 2, 0).numpy()), x)
            flipped += folder.flip_decision(i)
    assert 0 < flipped < 2 * len(folder)


@pytest.mark.parametrize("flags", [[], ["--path-type", "cosine", "--weighting", "lognormal", "--proj-coeff", "2"]])
def test_the_repa_micro_step_is_repas_recipe(repa_inputs, flags):
    """train.py --repa's flags -> config -> TrainStep's micro-step: the same number as REPA's recipe,
    written here from its train.py (zs = the encoder's tokens of the raw images; loss, proj_loss =
    SILoss(model, x, dict(y=y), zs); loss.mean() + proj_coeff * proj_loss) from the same seed."""
    from dit_fast.config import config_from_args
    from dit_fast.models import build_model
    from dit_fast.repa import SILoss, load_encoder
    from dit_fast.train import cli
    from dit_fast.train.objective import wrap_model
    from dit_fast.train.step import TrainStep
    from tests.test_train_flow import _Engine
    feat, vae, encoder_dir = repa_inputs
    cfg = config_from_args(cli.build_parser().parse_args([
        *MODEL, "--features-path", str(feat), "--vae", str(vae), "--repa", "--encoder", str(encoder_dir),
        "--encoder-depth", "1", "--projector-dim", "16", *flags]))
    cfg.model.in_channels, cfg.model.input_size = 4, 16
    torch.manual_seed(0)
    model = wrap_model(cfg, build_model(cfg.model))
    x, y = torch.randn(3, 4, 16, 16), torch.tensor([0, 1, 2])
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    step = TrainStep.from_config(cfg, _Engine(model), None, torch.device("cpu"))
    step.dtype = torch.float32
    torch.manual_seed(5)
    got = step.micro_step(x, y, images)
    r = cfg.repa
    torch.manual_seed(5)
    with torch.no_grad():
        zs = [load_encoder("dinov2-vit-b", str(encoder_dir), resolution=32)(images)]
        loss, proj_loss = SILoss(path_type=r.repa_path_type, weighting=r.weighting)(model, x, dict(y=y), zs)
        want = loss.mean() + r.proj_coeff * proj_loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)   # the same draws; sums may differ by an ulp
    assert proj_loss != 0 and r.proj_coeff == (2.0 if flags else 0.5)


def test_evaluation_during_training_samples_the_dit_with_repas_sampler():
    """--eval-every on a REPA run: REPA's samplers in REPA's time (default its Heun ODE), on the EMA's
    DiT alone (the projector is not part of the sampled model)."""
    from types import SimpleNamespace

    from dit_fast.config import Config
    from dit_fast.models import build_model
    from dit_fast.repa import REPAModel, build_projector
    from dit_fast.train.evaluate import TrainingEvaluator, _check_sampler, sample_config
    cfg = Config()
    cfg.train.objective, cfg.repa.repa_path_type = "repa", "cosine"
    sc = sample_config(cfg)
    assert (sc.objective, sc.mode, sc.heun, sc.guide_all_channels, sc.repa_path_type) == (
        "repa", "ODE", True, True, "cosine")
    cfg.evaluation.eval_sampler = "sde"
    assert sample_config(cfg).mode == "SDE"
    cfg.evaluation.eval_sampler = "dopri5"
    with pytest.raises(ValueError, match="a REPA model is evaluated with one of"):
        _check_sampler(cfg)
    m = cfg.model
    m.model, m.depth, m.hidden_size, m.num_heads, m.in_channels, m.input_size = "DiT-S/2", 1, 32, 2, 4, 4
    dit = build_model(m)
    wrapped = REPAModel(dit, [build_projector(32, 8, 4)], encoder_depth=1)
    fake = SimpleNamespace(world=1, rank=0)
    assert TrainingEvaluator._ema_on_every_rank(fake, SimpleNamespace(model=wrapped)) is dit
