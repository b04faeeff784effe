"""Likelihood terms of the ADM variational bound (KL between Gaussians, discretized decoder NLL).

The arithmetic is written in the same order as DiT's diffusion_utils so that fp32 results agree
with the original to the last bit on the same inputs; reordering a sum here is a visible change.
"""
import math

import torch

# sqrt(2 / pi) of the tanh approximation of the standard normal CDF (a Python float, as the
# original's numpy scalar is, so the product stays in the tensor's dtype).
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; any of them may be a Python float as long as one is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument")
    # torch.exp needs tensors; scalars take the reference tensor's dtype and device.
    logvar1, logvar2 = [
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (the one ADM/DiT use, kept for parity)."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def continuous_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """Log density of the standardised residual (x - means) / exp(log_scales) under N(0, 1), in nats.

    Like the original, this is the density of the normalised value (no -log_scales Jacobian term).
    """
    normalized_x = (x - means) * torch.exp(-log_scales)
    return torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x)).log_prob(normalized_x)


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """Log probability (nats) of x under a Gaussian discretised into 256 bins on [-1, 1].

    x, means, log_scales: tensors of one shape (x is assumed to be uint8 data rescaled to [-1, 1]);
    the edge bins extend to -inf / +inf. Returns a tensor of x's shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood needs x, means and log_scales of one shape, got "
            f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # Clamp before the log: the CDF approximation saturates to exactly 0 / 1 far in the tails.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
