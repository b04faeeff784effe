"""Timestep respacing: run a diffusion on a subset of the original process's timesteps.

The kept timesteps define new betas, 1 - abar_k / abar_{previous kept}, computed in float64 from
the original alphas_cumprod (as DiT does; float32 would move them by ~1e-4 relative). The model
still sees original timestep values: the respaced index is mapped through timestep_map by an
on-device lookup table built once per device.
"""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def _ddim_stride_steps(num_timesteps, desired_count):
    # DDIM paper striding: range(0, T, stride) for the first integer stride with the wanted length.
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    counts = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)})
    below = [c for c in counts if c < desired_count][-3:]
    above = [c for c in counts if c > desired_count][:3]
    raise ValueError(
        f"'ddim{desired_count}' is impossible with {num_timesteps} diffusion steps: no integer stride "
        f"gives exactly {desired_count} steps. Nearby counts that work: "
        f"{', '.join(str(c) for c in below + above) or 'none'}; or use the plain string "
        f"'{desired_count}' (evenly spaced, any count up to {num_timesteps})"
    )


def _parse_section_counts(num_timesteps, section_counts):
    """A respacing spec ("250", "10,20,30", "ddim50", an int or a list of ints) -> list of ints,
    or a set of steps for the ddim form."""
    if isinstance(section_counts, int):
        return [section_counts]
    if not isinstance(section_counts, str):
        counts = list(section_counts)
        if not all(isinstance(c, (int, np.integer)) for c in counts):
            raise ValueError(f"section counts must be ints, got {section_counts!r}")
        return [int(c) for c in counts]
    spec = section_counts.strip()
    help_text = ('use a step count like "250", comma-separated counts per equal section like '
                 '"10,20,30", or "ddimN" like "ddim50"')
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"bad timestep respacing {section_counts!r}: {help_text}") from None
        if desired < 1:
            raise ValueError(f"bad timestep respacing {section_counts!r}: ddim needs at least 1 step")
        return _ddim_stride_steps(num_timesteps, desired)
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"bad timestep respacing {section_counts!r}: {help_text}") from None


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    The process is split into len(section_counts) equal sections (the first T % len ones one step
    longer), and section i keeps section_counts[i] evenly spaced steps including both its ends.
    section_counts is a list of ints or a string "10,20,30"; "ddimN" instead uses the DDIM paper's
    integer stride (one section). E.g. space_timesteps(1000, "250") keeps 0, 4, 8, ..., 999.
    """
    parsed = _parse_section_counts(num_timesteps, section_counts)
    if isinstance(parsed, set):
        return parsed
    if not parsed:
        raise ValueError("timestep respacing needs at least one section count")
    size_per, extra = divmod(num_timesteps, len(parsed))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(parsed):
        size = size_per + (1 if i < extra else 0)
        if section_count < 0:
            raise ValueError(f"section counts must be >= 0, got {section_count} in {section_counts!r}")
        if size < section_count:
            raise ValueError(
                f"cannot divide section {i} of {size} steps into {section_count} steps "
                f"(respacing {section_counts!r} over {num_timesteps} diffusion steps in "
                f"{len(parsed)} section(s)); use at most {size} steps per section"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float stride step by step and round half to even (Python's round), exactly
        # as the original does: i * frac_stride would pick different steps in rare cases.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"timestep respacing {section_counts!r} keeps no timesteps")
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset `use_timesteps` of a base process given by `betas`.

    timestep_map[k] is the original timestep of respaced index k; models passed to the methods
    are wrapped so they receive original timesteps.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(int(s) for s in use_timesteps)
        base_betas = np.array(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        bad = [s for s in self.use_timesteps if not 0 <= s < self.original_num_steps]
        if bad or not self.use_timesteps:
            raise ValueError(
                f"use_timesteps must be a non-empty set within [0, {self.original_num_steps}), "
                f"got out-of-range {sorted(bad)[:5]}" if bad else "use_timesteps is empty"
            )
        alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        self.timestep_map = sorted(self.use_timesteps)
        kept = alphas_cumprod[self.timestep_map]
        # Elementwise the same float64 operations as the original's running loop.
        kwargs["betas"] = 1 - kept / np.append(1.0, kept[:-1])
        super().__init__(**kwargs)
        self._map_tables = {}  # (device, dtype) -> (T',) tensor of original timesteps

    def _timestep_map_on(self, device, dtype):
        key = (device, dtype)
        table = self._map_tables.get(key)
        if table is None:
            table = torch.tensor(self.timestep_map, device=device, dtype=dtype)
            self._map_tables[key] = table
        return table

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def _scale_timesteps(self, t):
        # Kept for API compatibility: the wrapped model does the mapping; no rescaling.
        return t


class _WrappedModel:
    """Calls `model` with original timesteps: model(x, timestep_map[ts], **kwargs)."""

    def __init__(self, model, diffusion):
        self.model = model
        self.timestep_map = diffusion.timestep_map
        self.original_num_steps = diffusion.original_num_steps
        self._diffusion = diffusion

    def __call__(self, x, ts, **kwargs):
        new_ts = self._diffusion._timestep_map_on(ts.device, ts.dtype)[ts]
        return self.model(x, new_ts, **kwargs)
