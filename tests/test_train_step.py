"""The trainer's speed levers keep the numbers: fused AdamW (the optimizer train.py builds) against the
foreach reference, and --grad-checkpointing selective from the command line to the built model."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_fast.config import Config, config_from_args  # noqa: E402
from dit_fast.models import build_model  # noqa: E402
from dit_fast.train import cli as train_cli  # noqa: E402
from dit_fast.train.engine import build_optimizer, fused_adamw_supported  # noqa: E402

TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--image-size", "8",
        "--num-classes", "10", "--vae", "none", "--features-path", "x"]


def tiny_model(cfg: Config):
    cfg.model.in_channels, cfg.model.input_size = 4, 8
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_fused_adamw_matches_the_foreach_reference_on_dit():
    """The optimizer train.py builds is torch's fused AdamW (CPU too, in torch >= 2.4); five steps of
    DiT-shaped updates agree with foreach AdamW (the old default) to fp32 rounding."""
    cfg = config_from_args(train_cli.build_parser().parse_args([*TINY, "--lr", "1e-2"]))
    fused_model, ref_model = tiny_model(cfg), tiny_model(cfg)
    fused = build_optimizer(fused_model, cfg, {}, torch.device("cpu"))
    assert fused_adamw_supported(torch.device("cpu")) and fused.defaults["fused"]
    o = cfg.optim
    ref = torch.optim.AdamW(ref_model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(fused_model.parameters(), ref_model.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
        fused.step()
        ref.step()
    for (name, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            if p in fused.state:
                torch.testing.assert_close(fused.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("value, want", [("selective", "selective"), ("0.5", 0.5), (None, 1.0)])
def test_grad_checkpointing_flag_reaches_the_model(value, want):
    argv = [*TINY, "--grad-checkpointing"] + ([value] if value else [])
    cfg = config_from_args(train_cli.build_parser().parse_args(argv))
    assert cfg.model.grad_checkpointing == want
    blocks = tiny_model(cfg).blocks
    policy = "selective" if want == "selective" else "full"
    assert [b.checkpoint_policy for b in blocks] == [policy] * 2
    assert sum(b.grad_checkpointing for b in blocks) == (1 if want == 0.5 else 2)


def test_grad_checkpointing_rejects_other_words():
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args([*TINY, "--grad-checkpointing", "some"])
    cfg = Config()
    cfg.model.grad_checkpointing = "some"
    from dit_fast.config import validate_config
    cfg.data.features_path = "x"
    with pytest.raises(ValueError, match="'selective'"):
        validate_config(cfg)
