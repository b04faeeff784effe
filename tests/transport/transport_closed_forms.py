"""The interpolants' coefficients in closed form, written from their definitions for the tests (not
from dit_fast.transport): (alpha_t, d alpha_t / dt, sigma_t, d sigma_t / dt) of a float tensor t."""
import math

import torch

B_MIN, B_MAX = 0.1, 20.0   # the VP-SDE's beta range (Song et al. 2021), SiT's VP constants


def coefficients(path, t):
    if path == "Linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "GVP":
        h = math.pi / 2
        return torch.sin(h * t), h * torch.cos(h * t), torch.cos(h * t), -h * torch.sin(h * t)
    s = 1 - t   # VP: diffusion time s, alpha = exp(-1/2 int_0^s beta), beta(s) = B_MIN + s (B_MAX - B_MIN)
    alpha = torch.exp(-0.5 * (B_MIN * s + 0.5 * (B_MAX - B_MIN) * s * s))
    d_alpha = alpha * (B_MIN + (B_MAX - B_MIN) * s) / 2
    sigma = torch.sqrt(1 - alpha ** 2)
    return alpha, d_alpha, sigma, -alpha * d_alpha / sigma
