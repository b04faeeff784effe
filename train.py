"""Train a DiT under DeepSpeed (ZeRO 0-3, bf16/fp16/fp32, EMA, exact resume).

    deepspeed train.py --deepspeed_config configs/deepspeed/zero2.json --model DiT-XL/2 \\
        --features-path /data/in1k-latents
    torchrun --nproc_per_node 8 train.py ...       # also works; so does plain `python train.py ...`
    deepspeed train.py ... --num-classes 37 --init-from DiT-XL-2-256x256.pt   # fine-tune: a new run

Many nodes (passwordless ssh; --results-dir and the data on a filesystem all nodes share, since
every rank writes its shard of each checkpoint into the same directory):

    $ cat hostfile
    node1 slots=8
    node2 slots=8
    deepspeed --hostfile hostfile --master_addr node1 train.py \
        --deepspeed_config configs/deepspeed/zero2.json --model DiT-XL/2 \
        --features-path /shared/in1k-latents --results-dir /shared/results --global-batch-size 256

Flags keep DiT / fast-DiT names; batch size, accumulation, precision and clipping are injected into
the DeepSpeed JSON (which holds ZeRO knobs only). See dit_fast/train/ for the semantics.
"""
from dit_fast.train.cli import cli

cli()  # a script, run only: the library is dit_fast.train.cli (import that, never this file)
