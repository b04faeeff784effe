"""Small stand-ins for DiT weights shared by the checkpoint tests."""
import torch
import torch.nn as nn

from dit_fast.models import DiT

# A tiny square DiT with 10 classes and RGB pixels: the shapes every diffusers test uses.
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10)


class Tiny(nn.Module):
    """Stands in for DiT: a few named submodules with weights and a buffer."""

    def __init__(self, width=4):
        super().__init__()
        self.x_embedder = nn.Linear(3, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.register_buffer("pos_embed", torch.zeros(1, 5, width))


def seeded(seed: int, build):
    """``build()`` right after seeding torch's global RNG (module initialisers draw from it)."""
    torch.manual_seed(seed)
    return build()


def tiny_state(seed=0, width=4):
    return seeded(seed, lambda: Tiny(width)).state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def perturbed_dit(seed=0, **overrides):
    """A perturbed DiT (adaLN-Zero would output zeros) with the fixed sin-cos pos_embed intact."""
    model = seeded(seed, lambda: DiT(**{**SMALL, **overrides}))
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.detach().add_(torch.randn_like(p) * 0.1)  # in place, outside autograd
    return model.eval()


def dit_inputs(model, n=4):
    g = torch.Generator().manual_seed(1)
    side = model.x_embedder.img_size[0]
    x = torch.randn(n, model.in_channels, side, side, generator=g)
    return x, torch.tensor([0, 1, 500, 999])[:n], torch.tensor([0, 3, model.num_classes - 1, model.num_classes])[:n]


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()
