"""Fast in-process tests of the training pieces: config tree, DeepSpeed-config injection, data order,
checkpoint bookkeeping, RNG capture, EMA, and every bad input failing before any step."""
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_fast.config import (Config, config_from_args, config_from_dict, config_to_dict,  # noqa: E402
                             format_config, load_config, save_config)
from dit_fast.train import cli as train_cli  # noqa: E402
from dit_fast.train.resume import config_differences, resolve_resume  # noqa: E402
from dit_fast.train.run_dir import (capture_rng, check_same_model,  # noqa: E402
                                       prune_checkpoints, recover_checkpoints,
                                       restore_rng)
from dit_fast.train.data import ShardOrder  # noqa: E402
from dit_fast.train.ema import EMA  # noqa: E402
from dit_fast.train.engine import DeepSpeedConfigError, build_deepspeed_config  # noqa: E402

TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
        "--image-size", "8", "--num-classes", "10", "--vae", "none", "--num-workers", "0",
        "--global-batch-size", "16", "--max-steps", "1"]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from dit_fast.data import write_digits_features
    return write_digits_features(tmp_path_factory.mktemp("digits") / "feat8", 8)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def parse(*extra):
    return config_from_args(train_cli.build_parser().parse_args([*TINY, *extra]))


# ------------------------------------------------------------------ config

def test_configs_saved_before_adaln_backend_still_load():
    """config.json / train_state configs written by earlier code hold model.fused_adaln (a bool)."""
    old = config_to_dict(Config())
    for flag, backend in ((True, "triton"), (False, "torch"), ("auto", "auto")):
        model = {k: v for k, v in old["model"].items() if k != "adaln_backend"}
        cfg = config_from_dict({**old, "model": {**model, "fused_adaln": flag}})
        assert cfg.model.adaln_backend == backend
    assert parse("--features-path", "x", "--fused-adaln").model.adaln_backend == "triton"
    assert parse("--features-path", "x", "--adaln-backend", "auto").model.adaln_backend == "auto"


def test_prepare_resolves_a_copy_and_never_writes_the_users_config(digits8, tmp_path):
    """Derived values (channels and latent side from the data, the micro batch) go into the resolved
    config, computed once; the config the user built stays as given."""
    import copy

    from dit_fast.train.loop import prepare
    cfg = parse("--features-path", str(digits8), "--global-batch-size", "8", "--results-dir", str(tmp_path))
    before = copy.deepcopy(cfg)
    resolved, ds_config, _, init_plan = prepare(cfg)
    assert cfg == before and cfg.model.in_channels is None and cfg.train.micro_batch_size is None
    assert (resolved.model.in_channels, resolved.model.input_size, resolved.train.micro_batch_size) == (1, 8, 8)
    assert ds_config["train_micro_batch_size_per_gpu"] == 8 and init_plan is None  # no --init-from


def test_config_round_trip_and_flags(tmp_path):
    cfg = parse("--features-path", "x", "--grad-checkpointing", "--local_rank=1", "--lr", "3e-4",
                "--precision", "fp32", "--resume", "auto", "--max-steps", "7")
    assert cfg.model.grad_checkpointing == 1.0 and cfg.optim.lr == 3e-4
    assert cfg.train.precision == "fp32" and cfg.train.resume == "auto" and cfg.train.max_steps == 7
    assert parse("--features-path", "x", "--grad-checkpointing", "0.5").model.grad_checkpointing == 0.5
    assert config_from_dict(config_to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    assert "train.max_steps = 7" in format_config(cfg)
    # plain dicts only: a checkpoint holding the config loads with weights_only=True
    torch.save({"config": config_to_dict(cfg)}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["config"] == config_to_dict(cfg)


def test_model_flags_read_back_into_the_same_model_config():
    """config.model_flags (the demo's child train.py command) is add_model_flags' inverse, size
    overrides and backends included; a defaults mapping changes the defaults and the help."""
    import argparse

    from dit_fast.config import ModelConfig, add_model_flags, model_config_from_args, model_flags
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    for m in (ModelConfig(), ModelConfig(model="DiT-S/4", image_size=32, num_classes=7, depth=2, hidden_size=48,
                                         num_heads=3, attn_backend="math", adaln_backend="triton")):
        assert model_config_from_args(parser.parse_args(model_flags(m))) == m
    small = argparse.ArgumentParser()
    add_model_flags(small, defaults=dict(model="DiT-S/2", image_size=8, depth=4))
    got = model_config_from_args(small.parse_args([]))
    assert (got.model, got.image_size, got.num_classes, got.depth, got.hidden_size) == ("DiT-S/2", 8, 1000, 4, None)
    assert "(default DiT-S/2)" in small.format_help()
    shown = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(shown, defaults=dict(model="DiT-S/2"))
    assert "(default: DiT-S/2)" in shown.format_help() and "(default DiT-S/2)" not in shown.format_help()


@pytest.mark.parametrize("extra, match", [
    ([], "exactly one of --features-path"),
    (["--features-path", "x", "--data-path", "y"], "exactly one of --features-path"),
    (["--features-path", "x", "--grad-checkpointing", "2"], "fraction of blocks"),
    (["--features-path", "x", "--ema-decay", "1.5"], "--ema-decay"),
])
def test_config_rejects_bad_values(extra, match):
    with pytest.raises(ValueError, match=match):
        parse(*extra)


# ------------------------------------------------------------------ DeepSpeed config

def ds_json(tmp_path, obj) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_shipped_deepspeed_configs_hold_zero_knobs_only():
    for name in ("zero1", "zero2", "zero3", "zero2_offload"):
        path = ROOT / "configs" / "deepspeed" / f"{name}.json"
        assert set(json.loads(path.read_text())) == {"zero_optimization"}, path
        cfg = parse("--features-path", "x", "--deepspeed_config", str(path), "--grad-accum", "2")
        out = build_deepspeed_config(cfg, world_size=2)
        assert out["train_batch_size"] == 16 and out["gradient_accumulation_steps"] == 2
        assert out["train_micro_batch_size_per_gpu"] == 4 and out["bf16"]["enabled"]
        assert not out["fp16"]["enabled"] and out["gradient_clipping"] == 0.0


def test_fp16_gets_dynamic_loss_scaling():
    cfg = parse("--features-path", "x", "--precision", "fp16", "--grad-clip", "1.0")
    out = build_deepspeed_config(cfg, world_size=1)
    assert out["fp16"]["enabled"] and out["fp16"]["loss_scale"] == 0
    assert not out["bf16"]["enabled"] and out["gradient_clipping"] == 1.0


@pytest.mark.parametrize("obj, key", [
    ({"train_batch_size": 32}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"bf16": {"enabled": False}}, "bf16.enabled"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
])
def test_deepspeed_config_contradicting_flags_is_named(tmp_path, obj, key):
    cfg = parse("--features-path", "x", "--deepspeed_config", ds_json(tmp_path, obj))
    with pytest.raises(DeepSpeedConfigError, match=key):
        build_deepspeed_config(cfg, world_size=1)


def test_deepspeed_config_agreeing_values_and_auto_pass(tmp_path):
    obj = {"train_batch_size": 16, "gradient_accumulation_steps": "auto", "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2}}
    cfg = parse("--features-path", "x", "--deepspeed_config", ds_json(tmp_path, obj))
    assert build_deepspeed_config(cfg, world_size=2)["train_micro_batch_size_per_gpu"] == 8


def test_batch_not_divisible_by_world_and_accum():
    cfg = parse("--features-path", "x", "--grad-accum", "3")
    with pytest.raises(ValueError, match="not divisible by world size 2 x --grad-accum 3"):
        build_deepspeed_config(cfg, world_size=2)


# ------------------------------------------------------------------ bad inputs, before any step

def cli_error(capsys, *extra) -> str:
    assert train_cli.main([*TINY, *extra]) == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_before_any_step(tmp_path, digits8, capsys):
    res = ["--results-dir", str(tmp_path / "res")]
    assert "does not exist" in cli_error(capsys, "--features-path", str(tmp_path / "nope"), *res)
    (tmp_path / "empty").mkdir()
    assert "is empty" in cli_error(capsys, "--features-path", str(tmp_path / "empty"), *res)
    err = cli_error(capsys, "--features-path", str(digits8), "--image-size", "16", *res)
    assert "(1, 8, 8)" in err and "--image-size 8" in err
    err = cli_error(capsys, "--features-path", str(digits8), "--vae", "ema", "--image-size", "64", *res)
    assert "(1, 8, 8)" in err and "--image-size 8 --vae none" in err
    assert "outside [0, 5)" in cli_error(capsys, "--features-path", str(digits8), "--num-classes",
                                         "5", *res)
    bad_ds = ds_json(tmp_path, {"train_batch_size": 64, "zero_optimization": {"stage": 2}})
    assert "train_batch_size" in cli_error(capsys, "--features-path", str(digits8),
                                           "--deepspeed_config", bad_ds, *res)
    assert not (tmp_path / "res").exists()  # nothing started: no run dir, no step


def test_sampler_shards_are_disjoint_reproducible_and_resumable():
    world, n, mb = 3, 50, 4
    samplers = [ShardOrder(n, r, world, mb, seed=7, with_flips=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    epoch = [list(s) for s in samplers]
    seen = [i for batches in epoch for b in batches for i, _ in b]
    assert len(seen) == world * (17 // mb) * mb and len(set(seen)) == len(seen)
    assert {f for batches in epoch for b in batches for _, f in b} == {0, 1}
    samplers[1].set_epoch(2, skip_batches=2)
    assert list(samplers[1]) == epoch[1][2:]
    samplers[1].set_epoch(3)
    assert list(samplers[1]) != epoch[1]


# ------------------------------------------------------------------ checkpoint bookkeeping

def fake_ckpt(root: Path, step: int, complete=True, config=None, mtime=None) -> Path:
    path = root / "checkpoints" / (f"step-{step:07d}" + ("" if complete else ".tmp"))
    path.mkdir(parents=True)
    if complete:
        torch.save({"step": step, "config": config}, path / "train_state.pt")
        if mtime is not None:
            os.utime(path / "train_state.pt", (mtime, mtime))
    return path


def test_resume_auto_only_continues_the_same_experiment_newest_by_time(tmp_path):
    a = config_to_dict(parse("--features-path", str(tmp_path)))
    b = config_to_dict(parse("--features-path", str(tmp_path), "--lr", "3e-4"))
    run_a, run_b = tmp_path / "000-DiT-S-2", tmp_path / "001-DiT-S-2"
    fake_ckpt(run_a, 10, config=a, mtime=1000)
    newest_a = fake_ckpt(run_a, 5, config=a, mtime=3000)  # restarted from 5: its timeline is newer
    fake_ckpt(run_b, 20, config=b, mtime=2000)
    fake_ckpt(run_a, 30, complete=False)  # killed mid-save: ignored
    choice = resolve_resume("auto", str(tmp_path), a)
    assert choice.path == newest_a
    assert any("differs: optim.lr: checkpoint 0.0003 vs now 0.0001" in n for n in choice.notes)
    assert resolve_resume("auto", str(tmp_path), b).path == run_b / "checkpoints" / "step-0000020"
    c = config_to_dict(parse("--features-path", str(tmp_path), "--global-seed", "7"))
    fresh = resolve_resume("auto", str(tmp_path), c)
    assert fresh.path is None and "starting fresh" in fresh.notes[-1]
    assert resolve_resume("auto", str(tmp_path / "none"), a).path is None
    # --resume PATH: deliberate changes go through, listed
    deliberate = resolve_resume(str(run_b / "checkpoints" / "step-0000020"), str(tmp_path), a)
    assert "optim.lr" in deliberate.notes[0]
    assert config_differences(a, config_to_dict(parse("--features-path", str(tmp_path),
                                                      "--attn-backend", "math"))) == []


def test_resume_path_checks_and_prune_keeps_last(tmp_path):
    run = tmp_path / "000-DiT-S-2"
    fake_ckpt(run, 10)
    fake_ckpt(run, 30, complete=False)
    with pytest.raises(ValueError, match="unfinished save"):
        resolve_resume(str(run / "checkpoints" / "step-0000030.tmp"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), str(tmp_path))
    for step in (40, 50):
        fake_ckpt(run, step)
    prune_checkpoints(run / "checkpoints", keep_last=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000040", "step-0000050"]


def test_interrupted_publish_is_recovered_never_pruned(tmp_path):
    # A crash between the renames of a replacing publish: step-50 moved aside, new one not in place.
    run = tmp_path / "000-DiT-S-2"
    fake_ckpt(run, 40)
    aside = fake_ckpt(run, 50)
    aside.rename(aside.with_name("step-0000050.old"))
    fake_ckpt(run, 50, complete=False)
    prune_checkpoints(run / "checkpoints", keep_last=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000050"]
    recover_checkpoints(run / "checkpoints")  # idempotent
    assert (run / "checkpoints" / "step-0000050" / "train_state.pt").is_file()


def test_resume_refuses_another_model_but_allows_speed_switches(tmp_path):
    saved = config_to_dict(parse("--features-path", "x"))["model"]
    fast = config_to_dict(parse("--features-path", "x", "--fused-adaln", "--grad-checkpointing",
                                "--attn-backend", "math"))["model"]
    check_same_model(saved, fast, tmp_path)
    other = config_to_dict(parse("--features-path", "x", "--depth", "3", "--num-classes", "7"))
    with pytest.raises(ValueError, match="depth: checkpoint 2 vs now 3; num_classes"):
        check_same_model(saved, other["model"], tmp_path)


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == want


def test_ema_matches_dit_update_ema():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(model, decay=0.9, keep=True, device=torch.device("cpu"))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():  # DiT: ema.mul_(decay).add_(param, alpha=1 - decay)
        want = reference[name].mul(0.9).add(p, alpha=0.1)
        assert torch.equal(ema.model.state_dict()[name], want)
    assert EMA(model, 0.9, keep=False, device=torch.device("cpu")).model is None


def test_default_config_is_dit():
    cfg = Config()
    assert (cfg.model.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.ema_decay) == \
        ("DiT-XL/2", 1e-4, 0.0, 0.9999)
    assert cfg.diffusion.timestep_respacing == "" and cfg.model.patch_size == 2


def test_every_train_flag_reaches_the_config():
    """_ARG_MAP is derived from the dataclass fields: a flag without a field would be dropped."""
    from dit_fast.config import _ARG_MAP
    cli_only = {"local_rank"}  # the deepspeed launcher's; LOCAL_RANK in the env is what counts
    dests = {a.dest for a in train_cli.build_parser()._actions if a.dest != "help"}
    assert dests - cli_only <= set(_ARG_MAP), dests - cli_only - set(_ARG_MAP)
