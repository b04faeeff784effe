"""dit_fast: a fast, faithful DiT (Scalable Diffusion Models with Transformers, Peebles & Xie).

Public entry points: ``dit_fast.models`` (DiT, DiT_models), ``dit_fast.diffusion`` (create_diffusion),
``dit_fast.checkpoint``, ``dit_fast.vae``. Importing the package is cheap: it imports no DeepSpeed,
diffusers or Triton and never touches CUDA or the network.
"""
__version__ = "0.1.0"
