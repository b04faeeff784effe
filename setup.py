"""dit-fast: a fast, faithful DiT. Packaging only: no hardware probing here."""
from setuptools import setup

REQUIRES = [
    # torch >= 2.6: weights_only loading without the known bypass (CVE-2025-32434). Install the torch
    # build you want first; the Makefile picks a CPU wheel on CPU-only machines.
    "torch>=2.6", "numpy", "pillow", "tqdm", "safetensors"]
EXTRAS = {
    "triton": ["triton"],
    "vae": ["diffusers"],
    "train": ["deepspeed", "tensorboard"],  # TensorBoard: train.py's scalars beside metrics.jsonl
    "demo": ["scikit-learn"],
    # evaluate.py: scipy's sqrtm for FID. torch-fidelity is NOT a dependency (our own Inception port;
    # tests compare with it from a private folder, see the Makefile)
    "eval": ["scipy"],
    "flow": ["torchdiffeq"],
    "repa": ["transformers"],
    "test": ["pytest", "pytest-benchmark", "scikit-learn", "scipy"]}
EXTRAS["all"] = sorted({name for group in EXTRAS.values() for name in group})

setup(name="dit-fast", version="0.1.0",
      description="Fast, faithful DiT (Scalable Diffusion Models with Transformers): Triton kernels, "
                  "DeepSpeed, torch.compile",
      python_requires=">=3.10",
      packages=[
          "dit_fast",
          "dit_fast.checkpoint",
          "dit_fast.data",
          "dit_fast.diffusion",
          "dit_fast.evaluation",
          "dit_fast.export_diffusers",
          "dit_fast.repa",
          "dit_fast.sampling",
          "dit_fast.train",
          "dit_fast.transport",
          "dit_fast_kernels",
      ],
      package_dir={"dit_fast_kernels": "kernels/dit_fast_kernels"},
      install_requires=REQUIRES, extras_require=EXTRAS)
