"""Respacing (Nichol & Dhariwal 2021, section 4): sample with a subset S of the T trained timesteps.

Keeping steps s_0 < s_1 < ... of the process defines a shorter process with the same marginals:
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}, computed in float64 from the original abar (float32 would move
them by ~1e-4 relative). The model is still called with the original timestep values s_k.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from .gaussian_diffusion import GaussianDiffusion

_SPEC_HELP = 'use a step count like "250", comma-separated counts per equal section like "10,20,30", ' \
             'or "ddimN" like "ddim50"'


def _ddim_strided(num_timesteps: int, count: int) -> set:
    """{0, k, 2k, ...} for the smallest integer stride k giving exactly ``count`` steps (the DDIM paper's)."""
    for stride in range(1, num_timesteps):
        kept = range(0, num_timesteps, stride)
        if len(kept) == count:
            return set(kept)
    possible = sorted({len(range(0, num_timesteps, k)) for k in range(1, num_timesteps)})
    nearby = [n for n in possible if n < count][-3:] + [n for n in possible if n > count][:3]
    raise ValueError(f"'ddim{count}' is impossible with {num_timesteps} diffusion steps: no integer stride "
                     f"gives exactly {count} steps. Nearby counts that work: "
                     f"{', '.join(map(str, nearby)) or 'none'}; or use the plain string "
                     f"'{count}' (evenly spaced, any count up to {num_timesteps})")


def _spec_int(text: str, spec) -> int:
    try:
        return int(text)
    except ValueError as not_a_number:
        raise ValueError(f"bad timestep respacing {spec!r}: {_SPEC_HELP}") from not_a_number


def _parse_spec(num_timesteps: int, spec):
    """A respacing spec -> a list of per-section counts, or directly the set of steps for "ddimN"."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        counts = list(spec)
        if not all(isinstance(n, (int, np.integer)) for n in counts):
            raise ValueError(f"section counts must be ints, got {spec!r}")
        return [int(n) for n in counts]
    text = spec.strip()
    if not text.startswith("ddim"):
        return [_spec_int(part, spec) for part in text.split(",")]
    count = _spec_int(text[len("ddim"):], spec)
    if count < 1:
        raise ValueError(f"bad timestep respacing {spec!r}: ddim needs at least 1 step")
    return _ddim_strided(num_timesteps, count)


def _section_steps(start: int, length: int, count: int) -> list:
    """``count`` steps spread evenly over [start, start + length), both ends included when count > 1.

    Positions accumulate a float stride and round half to even (Python's round), as the published code
    does; start + round(i * stride) picks a different step in rare cases.
    """
    stride = (length - 1) / (count - 1) if count > 1 else 1
    positions = itertools.accumulate(itertools.repeat(stride, max(count - 1, 0)), initial=0.0)
    return [start + round(pos) for pos in itertools.islice(positions, count)]


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """The set of original timesteps to keep.

    The T steps are cut into len(section_counts) equal sections (the first T % len of them one step
    longer) and section i keeps section_counts[i] evenly spread steps. ``section_counts``: a list of ints,
    an int, a string "10,20,30", or "ddimN" for the DDIM paper's integer stride instead.
    Example: space_timesteps(1000, "250") keeps 0, 4, 8, ..., 999.
    """
    counts = _parse_spec(num_timesteps, section_counts)
    if isinstance(counts, set):
        return counts
    if not counts:
        raise ValueError("timestep respacing needs at least one section count")
    base_length, n_longer = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for index, count in enumerate(counts):
        length = base_length + (index < n_longer)
        if count < 0:
            raise ValueError(f"section counts must be >= 0, got {count} in {section_counts!r}")
        if count > length:
            raise ValueError(f"cannot divide section {index} of {length} steps into {count} steps "
                             f"(respacing {section_counts!r} over {num_timesteps} diffusion steps in "
                             f"{len(counts)} section(s)); use at most {length} steps per section")
        kept += _section_steps(start, length, count)
        start += length
    if not kept:
        raise ValueError(f"timestep respacing {section_counts!r} keeps no timesteps")
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion over the kept timesteps ``use_timesteps`` of a process given by ``betas``.

    ``timestep_map[k]`` (the original's name; ``schedule.model_timesteps`` on the device) is the original
    timestep of step k, and the model is always called with it. ``base_betas`` keeps the trained
    process's betas, so a solver can be built on it for any schedule.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        base_betas = np.array(kwargs.pop("betas"), dtype=np.float64)
        self.original_num_steps = len(base_betas)
        self.use_timesteps = {int(s) for s in use_timesteps}
        outside = sorted(s for s in self.use_timesteps if not 0 <= s < self.original_num_steps)
        if outside:
            raise ValueError(f"use_timesteps must be a non-empty set within [0, {self.original_num_steps}), "
                             f"got out-of-range {outside[:5]}")
        if not self.use_timesteps:
            raise ValueError("use_timesteps is empty")
        self.timestep_map = sorted(self.use_timesteps)
        abar_kept = np.cumprod(1.0 - base_betas)[self.timestep_map]
        abar_before = np.concatenate([[1.0], abar_kept[:-1]])
        super().__init__(betas=1 - abar_kept / abar_before, model_timesteps=self.timestep_map,
                         base_betas=base_betas, **kwargs)
