"""Sampling a transport: the probability-flow ODE, the reverse-time SDE, and the ODE's likelihood.

``Sampler(transport).sample_ode(...)`` / ``.sample_sde(...)`` return ``fn(z, model, **model_kwargs)``
as in SiT: z is the noise at t = 0, ``model(x, t, **model_kwargs)`` any callable (a module, its
``forward_with_cfg`` or a compiled guided function) returning x's shape, t a (N,) tensor in [0, 1].
The ODE's result is a tensor (num_steps, *z.shape) of the states at the grid times (the last one is the
sample); the SDE's a list of num_steps tensors (num_steps - 1 SDE steps, then the last step), as SiT
returns them. Use ``fn(z, model, **kw)[-1]`` for the samples.

The SDE (for any w_t >= 0, the same marginals as the ODE):
    dx = [v(x, t) + w_t * score(x, t)] dt + sqrt(2 w_t) dW,
with v and the score both computed from one model call per drift evaluation (SiT calls the model
twice per step for them; the numbers are the same).
"""
from __future__ import annotations

import torch

from . import integrators
from .transport import Transport, check_model_output

LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


class Sampler:
    """ODE and SDE samplers for one Transport (SiT's ``Sampler``)."""

    def __init__(self, transport: Transport):
        self.transport, self.drift, self.score = transport, transport.get_drift(), transport.get_score()

    def _sde_drift_and_diffusion(self, diffusion_form, diffusion_norm):
        path, transport = self.transport.path_sampler, self.transport

        def diffusion(x, t):
            return path.diffusion_coefficient(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **model_kwargs):
            output = model(x, t, **model_kwargs)
            check_model_output(output, x)
            velocity, score = transport.velocity_and_score(output, x, t)
            return velocity + diffusion(x, t) * score
        return sde_drift, diffusion

    def _last_step(self, sde_drift, last_step, last_step_size):
        """The final step from t1 (short of data) to the sample: the SDE's mean ("Mean"), the
        posterior mean E[x1 | x] = (x + sigma^2 score) / alpha ("Tweedie"), an ODE step ("Euler"),
        or nothing (None)."""
        if last_step not in LAST_STEPS:
            raise NotImplementedError(f"last_step {last_step!r} is not one of {LAST_STEPS}")
        if last_step == "Mean":
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Euler":
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size
        if last_step == "Tweedie":
            path = self.transport.path_sampler

            def tweedie(x, t, model, **kw):
                # Every sample sits at the same time: one scalar alpha and sigma, from the first.
                alpha, sigma = path.alpha(t)[0][0], path.sigma(t)[0][0]
                return x / alpha + sigma ** 2 / alpha * self.score(x, t, model, **kw)
            return tweedie
        return lambda x, t, model, **kw: x   # None: the last SDE state is the sample

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0,
                   last_step="Mean", last_step_size=0.04, num_steps=250, noise_on_device=False):
        """fn(z, model, **model_kwargs) -> list of num_steps states; the last is the sample.

        The grid is num_steps times from t0 to t1 = 1 - last_step_size (1 - sample_eps without a
        last step); num_steps - 1 steps of ``sampling_method`` ("Euler": Euler-Maruyama, "Heun"),
        then ``last_step`` of size last_step_size. diffusion_form / diffusion_norm choose w_t
        (paths.DIFFUSION_FORMS); the default "SBDM" is infinite at t = 0, which a velocity model on
        Linear/GVP reaches (NaN samples, in SiT too): use "sigma" there, as SiT's sample.py does.
        The step noise comes from the CPU generator as in SiT (one host-to-device copy per step),
        unless ``noise_on_device`` (our addition) draws it on z's device."""
        last_step_size = 0.0 if last_step is None else last_step_size
        stepper = integrators.sde_stepper(sampling_method)
        sde_drift, diffusion = self._sde_drift_and_diffusion(diffusion_form, diffusion_norm)
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               diffusion_form=diffusion_form, sde=True, eval=True,
                                               reverse=False, last_step_size=last_step_size)
        if not t0 < t1:
            raise ValueError(f"the SDE runs forward in time; got t0={t0} >= t1={t1}")
        finish = self._last_step(sde_drift, last_step, last_step_size)

        def sample(z, model, **model_kwargs):
            with torch.no_grad():
                return integrate(z, model, **model_kwargs)

        def integrate(z, model, **model_kwargs):
            grid = integrators.time_grid(t0, t1, num_steps, z.device)
            dt = grid[1] - grid[0]
            sqrt_dt = torch.sqrt(dt)
            step_drift = lambda x, t: sde_drift(x, t, model, **model_kwargs)  # noqa: E731
            x, states = z, []
            for i in range(num_steps - 1):
                t = torch.ones(z.shape[0], dtype=z.dtype, device=z.device) * grid[i]
                x = stepper(step_drift, diffusion, x, t, dt, sqrt_dt, noise_on_device)
                states.append(x)
            t_end = torch.ones(z.shape[0], device=z.device) * t1
            states.append(finish(x, t_end, model, **model_kwargs))
            return states
        return sample

    def _ode_interval(self, reverse):
        return self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=False,
                                             eval=True, reverse=reverse, last_step_size=0.0)

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False):
        """fn(z, model, **model_kwargs) -> (num_steps, *z.shape) states at the grid times.

        Fixed-step methods (integrators.FIXED_STEP_METHODS, ours) take num_steps - 1 steps over the
        num_steps grid points; any other name is a torchdiffeq method (adaptive ones use atol / rtol and
        report the grid points by interpolation). ``reverse`` integrates from data to noise."""
        t0, t1 = self._ode_interval(reverse)
        velocity_field = self.drift

        def sample(z, model, **model_kwargs):
            first = z[0] if isinstance(z, tuple) else z

            def f(t, x):
                # SiT's time vector is float32 whatever the sample's dtype.
                t_vec = torch.ones(first.shape[0], device=first.device) * t
                return velocity_field(x, t_vec, model, **model_kwargs)
            grid = integrators.time_grid(t0, t1, num_steps, first.device)
            return integrators.solve_ode(f, z, grid, method=sampling_method, atol=atol, rtol=rtol)
        return sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3):
        """fn(x, model, **model_kwargs) -> (log p(x) per sample, the noise x maps to).

        Integrates the ODE from data to noise with the divergence estimated by Hutchinson's trick
        (one Rademacher probe per drift evaluation): log p(x) = log N(z) - int div v dt."""
        velocity_field = self.drift
        t0, t1 = self._ode_interval(False)

        def augmented(state, s, model, **model_kwargs):
            # The grid runs forward; the model sees t = 1 - s, so x moves from data towards noise.
            x = state[0]
            probe = torch.randint(2, x.size(), dtype=torch.float, device=x.device) * 2 - 1
            t = torch.ones_like(s) * (1 - s)
            with torch.set_grad_enabled(True):
                x = x.detach().requires_grad_(True)
                v = velocity_field(x, t, model, **model_kwargs)
                grad = torch.autograd.grad((v * probe).sum(), x)[0]
            divergence = (grad * probe).sum(dim=tuple(range(1, x.dim())))
            return -v.detach(), divergence

        def sample(x, model, **model_kwargs):
            def f(t, state):
                return augmented(state, torch.ones(x.shape[0], device=x.device) * t, model, **model_kwargs)
            grid = integrators.time_grid(t0, t1, num_steps, x.device)
            start = (x, torch.zeros(x.shape[0]).to(x))
            path, delta_logp = integrators.solve_ode(f, start, grid, method=sampling_method, atol=atol,
                                                     rtol=rtol)
            noise = path[-1]
            return self.transport.prior_logp(noise) - delta_logp[-1], noise
        return sample
