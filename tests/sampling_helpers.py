"""A tiny DiT registered as "DiT-T/2" and saved in the original checkpoint layout, for sampling tests
and benchmarks (no network, a few thousand parameters)."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "DiT-T/2"
TINY_KW = dict(depth=2, hidden_size=32, patch_size=2, num_heads=2)


def _build_tiny(**kwargs):
    from dit_fast.models import DiT
    return DiT(**TINY_KW, **kwargs)


def register_tiny_model() -> str:
    """Add "DiT-T/2" to DiT_models (idempotent) so the CLIs accept --model DiT-T/2."""
    from dit_fast.models import DiT_models
    DiT_models.setdefault(TINY_MODEL, _build_tiny)
    return TINY_MODEL


def save_tiny_checkpoint(path, *, input_size: int, in_channels: int = 3, num_classes: int = 10,
                         seed: int = 0, learn_sigma: bool = True) -> Path:
    """A randomly initialised tiny DiT state dict (original key layout) at `path`.

    adaLN-Zero starts with zeroed modulation (the model would output zeros); every parameter gets a
    seeded perturbation so samples depend on the weights, the labels and the guidance.
    """
    gen = torch.Generator().manual_seed(seed)
    model = _build_tiny(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                        learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def write_launcher(directory, script: str) -> Path:
    """A Python file that registers the tiny model and runs REPO/<script> as __main__ (for torchrun)."""
    launcher = Path(directory) / f"launch_{Path(script).stem}.py"
    launcher.write_text(
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'kernels')!r}]\n"
        "from tests.sampling_helpers import register_tiny_model\n"
        "register_tiny_model()\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
    )
    return launcher


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/sampling_helpers.py out.pt 8
    save_tiny_checkpoint(sys.argv[1], input_size=int(sys.argv[2]))
