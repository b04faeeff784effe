"""Time integration: fixed-step ODE solvers of our own, adaptive ones from torchdiffeq, and SDE steppers.

Time grids are ``torch.linspace(t0, t1, num_steps)`` built on the CPU in float32 (as SiT builds them, so
the grid points are the same numbers) and moved to the sample's device once per call; the per-step loops
then index that device tensor and never read a value back to the host, so they can run under
torch.compile / CUDA graphs. The fixed-step solvers reproduce torchdiffeq's fixed-grid methods of the same
name operation for operation (``euler``, ``midpoint``, ``heun2``), without its per-step host comparisons.
States may be tensors or tuples of tensors (the likelihood ODE carries (x, log p)).
"""
from __future__ import annotations

import importlib

import torch

FIXED_STEP_METHODS = ("euler", "midpoint", "heun2")
_METHOD_ALIASES = {"heun": "heun2"}   # SiT users say Heun; torchdiffeq's name is heun2
SDE_METHODS = ("Euler", "Heun")


def time_grid(t0: float, t1: float, num_steps: int, device) -> torch.Tensor:
    """(num_steps,) float32 times from t0 to t1, built on the CPU then moved (see the module docstring)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 (the grid includes both ends), got {num_steps}")
    return torch.linspace(t0, t1, num_steps).to(device)


def _add(y, dy):
    return tuple(a + b for a, b in zip(y, dy)) if isinstance(y, tuple) else y + dy


# Operand order is torchdiffeq's on purpose: with a 0-dim float32 time step and a bf16 / fp16 state,
# ``dt * f`` and ``f * dt`` round differently, and SiT's low-precision samples depend on which.
def _times(c, y):
    return tuple(c * a for a in y) if isinstance(y, tuple) else c * y


def _scaled(y, c):
    return tuple(a * c for a in y) if isinstance(y, tuple) else y * c


def _half_sum(y, z):
    # y * 1/2 + z * 1/2 elementwise over tuples (Heun's weights).
    if isinstance(y, tuple):
        return tuple(a * 0.5 + b * 0.5 for a, b in zip(y, z))
    return y * 0.5 + z * 0.5


def _euler_increment(f, t0, dt, y0):
    return _times(dt, f(t0, y0))


def _midpoint_increment(f, t0, dt, y0):
    half = 0.5 * dt
    y_mid = _add(y0, _scaled(f(t0, y0), half))
    return _times(dt, f(t0 + half, y_mid))


def _heun2_increment(f, t0, dt, y0):
    k1 = f(t0, y0)
    k2 = f(t0 + dt, _add(y0, _times(dt, k1)))
    return _times(dt, _half_sum(k1, k2))


_INCREMENTS = {"euler": _euler_increment, "midpoint": _midpoint_increment, "heun2": _heun2_increment}


def _stack(states):
    if isinstance(states[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*states))
    return torch.stack(states)


def _state_dtype(y):
    if isinstance(y, tuple):   # torchdiffeq concatenates a tuple state into one tensor
        dtype = y[0].dtype
        for part in y[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        return dtype
    return y.dtype


def _cast_like(y, like):
    if isinstance(y, tuple):
        return tuple(a.to(b.dtype) for a, b in zip(y, like))
    return y.to(like.dtype)


def solve_fixed(f, y0, grid: torch.Tensor, method: str):
    """Integrate dy/dt = f(t, y) over ``grid`` (a device tensor) with one step per grid interval.

    f takes a 0-dim time tensor. Returns every grid point's state stacked on a new first dimension
    (len(grid), ...), the first being y0, as torchdiffeq's odeint returns them. As there, f sees the
    time cast to the state's dtype, the state carries whatever precision its arithmetic gives, and
    the saved states are cast to y0's dtype (this only matters for a low-precision y0)."""
    increment = _INCREMENTS[method]

    def f_in_state_dtype(t, y):
        return f(t.to(_state_dtype(y)), y)
    states, y = [y0], y0
    for i in range(len(grid) - 1):
        y = _add(y, increment(f_in_state_dtype, grid[i], grid[i + 1] - grid[i], y))
        states.append(_cast_like(y, y0))
    return _stack(states)


def _torchdiffeq():
    try:
        return importlib.import_module("torchdiffeq")
    except ImportError:
        raise ImportError("adaptive ODE solvers (dopri5 and the others) come from torchdiffeq, which is not "
                          "installed: pip install torchdiffeq (or dit-fast[flow]), or use a fixed-step "
                          f"method ({', '.join(FIXED_STEP_METHODS)})") from None


def canonical_ode_method(method: str) -> str:
    """The solver name in torchdiffeq's spelling (``heun`` -> ``heun2``)."""
    return _METHOD_ALIASES.get(method.lower(), method.lower())


def solve_ode(f, y0, grid, *, method, atol, rtol):
    """Our fixed-step solver for FIXED_STEP_METHODS, else torchdiffeq.odeint(method=method) (adaptive
    methods save the solution at the grid points by interpolation, one entry per grid point)."""
    method = canonical_ode_method(method)
    if method in FIXED_STEP_METHODS:
        return solve_fixed(f, y0, grid, method)
    parts = len(y0) if isinstance(y0, tuple) else 1
    return _torchdiffeq().odeint(f, y0, grid, method=method, atol=[atol] * parts, rtol=[rtol] * parts)


def sde_noise(x: torch.Tensor, on_device: bool) -> torch.Tensor:
    """A standard normal draw shaped like x. SiT draws it from the CPU generator in float32 and moves
    it (so seeded runs match SiT's); ``on_device`` draws on x's device instead (no host copy per step)."""
    if on_device:
        return torch.randn_like(x)
    return torch.randn(x.shape).to(x)


def euler_maruyama_step(drift, diffusion, x, t, dt, sqrt_dt, noise_on_device):
    """x + drift dt + sqrt(2 w_t) dW: one Euler-Maruyama step of dx = drift dt + sqrt(2 w_t) dW."""
    dw = sde_noise(x, noise_on_device) * sqrt_dt
    mean = x + drift(x, t) * dt
    return mean + torch.sqrt(2 * diffusion(x, t)) * dw


def stochastic_heun_step(drift, diffusion, x, t, dt, sqrt_dt, noise_on_device):
    """SiT's "Heun": add the step's noise first, then a deterministic Heun step of the drift from there."""
    dw = sde_noise(x, noise_on_device) * sqrt_dt
    x_hat = x + torch.sqrt(2 * diffusion(x, t)) * dw
    k1 = drift(x_hat, t)
    k2 = drift(x_hat + dt * k1, t + dt)
    return x_hat + 0.5 * dt * (k1 + k2)


def sde_stepper(method: str):
    """The step function of an SDE method: "Euler" (Euler-Maruyama) or "Heun"."""
    stepper = {"euler": euler_maruyama_step, "heun": stochastic_heun_step}.get(str(method).lower())
    if stepper is None:
        raise NotImplementedError(f"SDE sampling_method {method!r} is not one of {', '.join(SDE_METHODS)}")
    return stepper
