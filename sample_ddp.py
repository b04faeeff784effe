"""Sample many images from a DiT on one or more processes and pack them for FID (the original's flags).

    torchrun --nproc_per_node 8 sample_ddp.py --num-fid-samples 50000           # official DiT-XL/2
    python sample_ddp.py --ckpt results/000-DiT-S-2 --num-fid-samples 1000      # a train.py run
    python sample_ddp.py --model DiT-S/2 --ckpt ckpt.pt --vae none --image-size 32 --num-fid-samples 1000

Writes {index:06d}.png into <sample-dir>/<model>-<ckpt>-size-<size>-vae-<vae>-cfg-<cfg>-seed-<seed>
(the original's folder), then rank 0 writes <folder>.npz with ``arr_0`` (N, H, W, 3) uint8 for the ADM
evaluation suite, exactly --num-fid-samples images. Runs under torchrun (NCCL on GPUs, Gloo on CPU) or as
a plain single process.

Resuming: rerun the same command after a crash or a stop; SIGTERM / SIGUSR1 / SIGINT let each process
finish the batch in flight (every PNG is written atomically), skip the .npz and exit 75, like train.py;
batches whose PNGs all exist are skipped. To make a
resumed run give the same images as an uninterrupted one, every batch draws its noise and labels from
its own generator seeded by (global seed, rank, batch index). This differs from the original, which
seeds each rank once (global_seed * world_size + rank) and draws all batches from that stream, so the
images are statistically equivalent but not the original's pixels (sample.py does match them).
"""
from dit_fast.sampling.fid_set import cli

cli()  # a script, run only: the library is dit_fast.sampling.fid_set (import that, never this file)
