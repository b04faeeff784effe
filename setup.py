"""dit-fast: a fast, faithful DiT. Packaging only: no hardware probing here."""
from setuptools import setup

setup(
    name="dit-fast",
    version="0.1.0",
    description="Fast, faithful DiT (Scalable Diffusion Models with Transformers): Triton kernels, DeepSpeed, torch.compile",
    python_requires=">=3.10",
    packages=["dit_fast", "dit_fast.data", "dit_fast.diffusion", "dit_fast.train", "dit_fast_kernels"],
    package_dir={"dit_fast_kernels": "kernels/dit_fast_kernels"},
    py_modules=[],
    install_requires=[
        "torch>=2.4",  # install the build you want first; the Makefile pins the CPU wheel on CPU-only machines
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "triton": ["triton"],
        "vae": ["diffusers"],
        "train": ["deepspeed"],
        "demo": ["scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "scipy"],
        "all": ["triton", "diffusers", "deepspeed", "scikit-learn", "scipy", "pytest", "pytest-benchmark"],
    },
)
