"""A tiny DiT for sampling tests and benchmarks: DiT-S/2 shrunk through the size flags the CLIs
already have (--depth/--hidden-size/--num-heads), saved in the original checkpoint layout (no
network, a few thousand parameters). Nothing here touches the global DiT_models."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "DiT-S/2"
TINY_SIZE = dict(depth=2, hidden_size=32, num_heads=2)
TINY_FLAGS = ["--model", TINY_MODEL, "--depth", "2", "--hidden-size", "32", "--num-heads", "2"]


def build_tiny(**kwargs):
    """The tiny DiT (patch 2, depth 2, width 32, 2 heads) with DiT's other constructor arguments."""
    import dataclasses

    from dit_fast.config import ModelConfig
    from dit_fast.models import build_model
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(model=TINY_MODEL, **TINY_SIZE, **{k: v for k, v in kwargs.items() if k in fields})
    return build_model(cfg, **{k: v for k, v in kwargs.items() if k not in fields})


def save_tiny_checkpoint(path, *, input_size: int, in_channels: int = 3, num_classes: int = 10,
                         seed: int = 0, learn_sigma: bool = True) -> Path:
    """A randomly initialised tiny DiT state dict (original key layout) at `path`.

    adaLN-Zero starts with zeroed modulation (the model would output zeros); every parameter gets a
    seeded perturbation so samples depend on the weights, the labels and the guidance.
    """
    gen = torch.Generator().manual_seed(seed)
    model = build_tiny(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                       learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/sampling_helpers.py out.pt 8
    save_tiny_checkpoint(sys.argv[1], input_size=int(sys.argv[2]))
