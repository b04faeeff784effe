"""Sample new images from a pre-trained DiT: the original sample.py's flags and images, faster.

    python sample.py --image-size 256 --seed 0                       # official DiT-XL/2, 250 DDPM steps
    python sample.py --compile --precision bf16 --class-labels 207 360 387 --out grid.png
    python sample.py --ckpt results/000-DiT-S-2        # a train.py run: its newest checkpoint; model,
                                                      # size, classes, VAE and diffusion from its config
    python sample.py --ckpt results/000-DiT-S-2/checkpoints/step-0100000   # or one checkpoint of it
    python sample.py --model DiT-S/2 --vae none --image-size 32 --ckpt weights.pt   # a plain file

With the same seed and weights, fp32 eager DDPM gives the same grid as the original sample.py.
"""
from dit_fast.sampling.grid import cli

cli()  # a script, run only: the library is dit_fast.sampling.grid (import that, never this file)
