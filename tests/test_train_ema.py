"""The EMA follows the fp32 MASTER weights (DiT's EMA is fp32), not the engine's bf16 working copy.

In process: the bf16 engine (ZeRO-0, DeepSpeed's fp32 copies in the optimizer wrapper) and ZeRO-2 in
a world of one, through the trainer's own step. Two CPU ranks through the real launcher: ZeRO-2 and
ZeRO-3, from the checkpoints train.py writes (the EMA export against DeepSpeed's own consolidation of
the fp32 master from the ZeRO shards, an independent code path).
"""
import pytest
import torch

from dit_fast.config import Config
from tests.conftest import requires_cuda

DECAY = 0.5  # large steps: a bf16-rounded source would show at once


def tiny_cfg(precision: str = "bf16") -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.model, m.depth, m.hidden_size, m.num_heads, m.num_classes = "DiT-S/2", 2, 64, 4, 10
    m.in_channels, m.input_size, m.attn_backend = 4, 8, "sdpa"
    t.global_batch_size, t.precision, t.ema_decay = 4, precision, DECAY
    cfg.optim.lr = 1e-2
    return cfg


def build(cfg: Config, stage: int):
    from dit_fast.distributed import init_distributed
    from dit_fast.train.engine import build_deepspeed_config, build_engine
    from dit_fast.train.step import TrainStep
    ctx = init_distributed(use_deepspeed=True)
    ds_config = build_deepspeed_config(cfg, 1)
    ds_config["zero_optimization"] = {"stage": stage}
    engine, ema = build_engine(cfg, ds_config, ctx.device, 0, 1)
    step = TrainStep.from_config(cfg, engine, ema, ctx.device)
    return engine, ema, step


def batches(n=4):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def independent_masters(engine) -> dict:
    """The fp32 master straight from DeepSpeed's optimizer, not through dit_fast.train.ema."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if hasattr(opt, "fp32_groups"):       # ZeRO-0 bf16/fp16 wrapper
        return {names[id(p)]: m.detach().clone() for g, mg in zip(opt.fp16_groups, opt.fp32_groups)
                for p, m in zip(g, mg)}
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).detach().clone()
            for n, p in engine.module.named_parameters() if p.requires_grad}


def check_ema_follows_master(stage: int, precision: str) -> None:
    from dit_fast.config import PRECISION_DTYPES
    engine, ema, step = build(tiny_cfg(precision), stage)
    assert next(engine.module.parameters()).dtype == PRECISION_DTYPES[precision]
    want = {k: v.clone() for k, v in ema.model.state_dict().items()}
    data = batches()
    rounded_off = 0.0
    for _ in range(3):
        step.optimizer_step(data)
        masters = independent_masters(engine)
        working = dict(engine.module.named_parameters())
        for name, master in masters.items():
            assert master.dtype == torch.float32
            expect_bf16 = want[name].mul(DECAY).add(working[name].float(), alpha=1 - DECAY)
            want[name] = want[name].mul_(DECAY).add_(master, alpha=1 - DECAY)
            got = ema.model.state_dict()[name]
            torch.testing.assert_close(got, want[name], rtol=0, atol=0, msg=name)
            rounded_off = max(rounded_off, (got - expect_bf16).abs().max().item())
    assert rounded_off > 0, "the master and the bf16 copy never differed: the test cannot tell them apart"
    # the frozen positional embedding (not optimized) keeps its exact fp32 initial value
    assert torch.equal(ema.model.pos_embed, want["pos_embed"])
    engine.destroy()


@pytest.mark.parametrize("stage", [0, 2])
def test_ema_is_the_fp32_formula_on_the_master_weights(stage):
    check_ema_follows_master(stage, "bf16")


@requires_cuda
@pytest.mark.parametrize("stage,precision", [(0, "fp16"), (2, "fp16"), (0, "bf16")])
def test_gpu_ema_is_the_fp32_formula_on_the_master_weights(stage, precision):
    """fp16 (DeepSpeed's loss-scaled wrappers) exists only on CUDA."""
    check_ema_follows_master(stage, precision)


def test_plain_module_and_fp32_engine_use_the_weights_themselves():
    from dit_fast.train.ema import master_weights
    model = torch.nn.Linear(3, 2)
    assert [n for n, _ in master_weights(model)] == ["weight", "bias"]
    assert all(w is not None and w.dtype == torch.float32 for _, w in master_weights(model))
    half = torch.nn.Linear(3, 2).bfloat16()
    with pytest.raises(RuntimeError, match="no fp32 master"):
        list(master_weights(half))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_ema_follows_the_consolidated_fp32_master(tmp_path, stage):
    """deepspeed --num_gpus 2 train.py, 3 steps, a checkpoint each: EMA_k = d EMA_{k-1} + (1 - d) M_k with
    M_k the fp32 master DeepSpeed consolidates from step k's ZeRO shards (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dit_fast.data import write_digits_features
    from tests.test_train_launch import ROOT, launch, ok, run_dir_of
    feats = write_digits_features(tmp_path / "feat8", 8)
    ok(launch(["--features-path", str(feats), "--results-dir", str(tmp_path / "runs"), "--deepspeed_config",
               str(ROOT / f"configs/deepspeed/zero{stage}.json"), "--max-steps", "3", "--ckpt-every", "1",
               "--keep-last", "0", "--ema-decay", str(DECAY)]))
    ckpts = run_dir_of(tmp_path / "runs") / "checkpoints"
    ema = {k: torch.load(ckpts / f"step-{k:07d}" / f"ema-{k:07d}.pt", weights_only=True)["ema"] for k in (1, 2, 3)}
    rounded_off = 0.0
    for k in (2, 3):
        master = get_fp32_state_dict_from_zero_checkpoint(str(ckpts / f"step-{k:07d}"), tag="ds")
        for name, m in master.items():
            if name == "pos_embed":  # frozen: not in the optimizer, its EMA stays the fp32 init
                assert torch.equal(ema[k][name], ema[1][name])
                continue
            want = ema[k - 1][name].mul(DECAY).add(m.float(), alpha=1 - DECAY)
            torch.testing.assert_close(ema[k][name], want, rtol=1e-6, atol=1e-7, msg=f"step {k} {name}")
            rounded = ema[k - 1][name].mul(DECAY).add(m.bfloat16().float(), alpha=1 - DECAY)
            rounded_off = max(rounded_off, (ema[k][name] - rounded).abs().max().item())
    assert rounded_off > 1e-5, "an EMA of the bf16 working copy would have passed too"
