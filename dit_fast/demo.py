"""`make demo` (placeholder until the built-in demo lands): sample a class grid from a small, randomly
initialised pixel-space DiT on the CPU, through the same model and diffusion code users run."""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from dit_fast.diffusion import create_diffusion
from dit_fast.models import DiT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/demo/sample.png")
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    model = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: give the random model something to say
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    diffusion = create_diffusion(str(args.num_sampling_steps))
    n = 10
    z = torch.randn(n, 1, 16, 16)
    y = torch.cat([torch.arange(n), torch.full((n,), 10)])
    start = time.perf_counter()
    samples = diffusion.p_sample_loop(model.forward_with_cfg, (2 * n, 1, 16, 16), torch.cat([z, z]),
                                      clip_denoised=False, model_kwargs=dict(y=y, cfg_scale=4.0), progress=True)
    samples = samples[:n].clamp(-1, 1)
    grid = ((samples + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()  # (n, 16, 16)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Image.fromarray(np.concatenate(list(grid), axis=1)).resize((16 * n * 4, 64), Image.NEAREST).save(args.out)
    print(f"sampled {n} images in {time.perf_counter() - start:.1f}s; grid written to {args.out}")


if __name__ == "__main__":
    main()
