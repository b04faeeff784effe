"""Sampling a DiT, one concern a module (the scripts sample.py / sample_ddp.py only call ``cli``).

    config.py      SampleConfig: the scripts' settings, holding the one tree's ModelConfig / DiffusionConfig
    build.py       build_sampler(model, diffusion, method=...): the one construction point; METHODS
                   maps each --sampler name to its factory
    base.py        Sampler: the one interface (compile(z_shape) -> seconds, sample(z, labels) -> x_0)
    guidance.py    Guidance: the model call, CFG batch doubling ([x, x], [y, null]) and autocast
    ancestral.py   DDPM / DDIM: the diffusion's own step functions (dit_fast.diffusion.steps) on its
                   device Schedule; eager fp32 DDPM is bit-identical to the original
    solvers.py     diffusers' DPM-Solver++ / UniPC / Euler / Heun on the diffusion's base betas
    flow.py        SiT's flow-matching ODE / SDE (dit_fast.transport) as methods "ode" / "sde"
    compiled.py    the one torch.compile / CUDA-graph warm-up helper, device timing
    images.py      the PNG grid, PNG folders and the .npz of the ADM evaluation suite
    resumable.py   many images over ranks, resumable: per-batch seeds, checkpoint identity, settings check
    run_source.py  --ckpt as a run dir / step dir / EMA file: the file to load and the saved config
    flags.py       the flags and checks sample.py and sample_ddp.py share, the model build
    grid.py        sample.py: one seeded grid
    fid_set.py     sample_ddp.py: a folder of PNGs and its .npz for FID

Extension points. A new sampling method subclasses ``base.Sampler`` (``_run`` = its loop,
``_warmup_args`` = one call of its compiled step, ``make_step(model_call)`` handed to the base) and
adds one entry to ``build.METHODS`` (flow.py is one); no DDPM code changes. The guidance interval
(``cfg_interval=(low, high)`` in the objective's coordinate) lives in ``Guidance`` (guided_at,
unguided: one forward of batch N) and ``Sampler.step_at(t)``, which every loop calls per step.
"""
from .base import Sampler
from .build import ANCESTRAL, FLOW_METHODS, METHODS, SAMPLERS, build_sampler, decode
from .compiled import default_compile_mode, timed
from .guidance import Guidance, check_null_label
from .solvers import SOLVERS, MissingDiffusersError

__all__ = ["Sampler", "build_sampler", "METHODS", "SAMPLERS", "FLOW_METHODS", "ANCESTRAL", "SOLVERS", "Guidance",
           "check_null_label", "decode", "timed", "default_compile_mode", "MissingDiffusersError"]
