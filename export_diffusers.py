"""Export a DiT checkpoint as a diffusers DiTPipeline folder (transformer/, scheduler/, vae/,
model_index.json), checked against our model with diffusers when it is installed.

    python export_diffusers.py --ckpt results/000-DiT-XL-2/checkpoints/step-0400000 --out DiT-diffusers
    python export_diffusers.py --ckpt ema.pt --out digits --model DiT-S/2 --depth 4 \
        --hidden-size 128 --num-heads 4 --image-size 8 --vae none --in-channels 1 --num-classes 10

The flags and the work are dit_fast.checkpoint.export (``python export_diffusers.py --help``). A script,
never imported (the library entry is dit_fast.checkpoint.export.cli), so it runs at once.
"""
import sys

from dit_fast.checkpoint.export import cli

sys.exit(cli())
