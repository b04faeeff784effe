"""Pre-extract VAE latents (or pixels) of an ImageFolder tree into packed, resumable shards.

    python extract_features.py --data-path /data/imagenet/train --features-path /data/in1k-latents
    torchrun --nproc_per_node 8 extract_features.py --data-path ... --features-path ...
    deepspeed extract_features.py --data-path ... --features-path ...

Each image is center-cropped (ADM) to --image-size and encoded twice, as is and flipped
horizontally; train.py picks one of the two per visit. Rerunning the same command resumes.
"""
from dit_fast.data.extract_cli import cli

cli()  # a script, run only: the library is dit_fast.data.extract_cli (import that, never this file)
