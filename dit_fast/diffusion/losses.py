"""The likelihood terms of the variational bound: the KL between two Gaussians and the discretised
Gaussian decoder of the image at t = 0 (Ho et al. 2020, section 3.3; Nichol & Dhariwal 2021).

Each sum is evaluated in a fixed order (the one the published training used), so fp32 losses agree bit
for bit with it on the same inputs; regrouping any of them is a visible change.
"""
from __future__ import annotations

import math

import torch

# Half the width of one of the 256 bins of 8-bit data scaled to [-1, 1] (bins are 2/255 wide).
_HALF_BIN = 1.0 / 255.0
# Edge bins reach to -inf / +inf; data values beyond these are the lowest / highest bin.
_LOWEST_BIN, _HIGHEST_BIN = -0.999, 0.999
# Probabilities are floored before the log: the tanh CDF saturates to exactly 0 or 1 in the tails.
_MIN_PROB = 1e-12


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): the mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _as_tensor_like(value, like: torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value).to(like)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

    = (logvar2 - logvar1 - 1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2) / 2. The arguments
    broadcast, and any may be a Python float so long as one is a tensor.
    """
    like = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument")
    logvar1, logvar2 = _as_tensor_like(logvar1, like), _as_tensor_like(logvar2, like)
    # One expression, in this order: autograd sums the gradient of logvar2 over its three uses in the
    # order they were recorded, and the published gradients come from exactly this order.
    return 0.5 * (logvar2 - 1.0 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2, the tanh approximation the decoder uses."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))
    return (torch.tanh(inner) + 1.0) * 0.5


def continuous_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """log N(z; 0, 1) of the standardised z = (x - means) / e^log_scales, in nats (there is no
    -log_scales Jacobian term, as in the original)."""
    z = (x - means) * torch.exp(-log_scales)
    standard = torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x))
    return standard.log_prob(z)


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """log P(x) in nats of 8-bit data x (scaled to [-1, 1]) under N(means, e^(2 log_scales)) integrated
    over x's bin [x - 1/255, x + 1/255]; the first and last bins extend to -inf and +inf.
    x, means and log_scales share one shape, which is also the result's."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError("discretized_gaussian_log_likelihood needs x, means and log_scales of one shape, got "
                         f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}")
    offset = x - means
    inv_sigma = torch.exp(-log_scales)
    upper = approx_standard_normal_cdf(inv_sigma * (offset + _HALF_BIN))
    lower = approx_standard_normal_cdf(inv_sigma * (offset - _HALF_BIN))
    log_upper = torch.log(upper.clamp(min=_MIN_PROB))                 # P(X <= upper edge): the lowest bin
    log_above_lower = torch.log((1.0 - lower).clamp(min=_MIN_PROB))   # P(X >= lower edge): the highest bin
    log_in_bin = torch.log((upper - lower).clamp(min=_MIN_PROB))
    inner_or_top = torch.where(x > _HIGHEST_BIN, log_above_lower, log_in_bin)
    return torch.where(x < _LOWEST_BIN, log_upper, inner_or_top)
