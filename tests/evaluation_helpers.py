"""Shared by the evaluation tests: a 2015-Inception state dict with random weights scaled so that
activations stay O(1) through all 94 conv layers (PyTorch's default init shrinks them to ~1e-8), and
a cheap stand-in for the Fréchet distance."""
import numpy as np
import torch
from torch import nn

from dit_fast.evaluation.inception import InceptionV3


def random_inception(seed: int = 0) -> InceptionV3:
    gen = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) * 0.05)
        net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=gen))
    return net.eval()


def save_random_weights(path, seed: int = 0):
    torch.save(random_inception(seed).state_dict(), path)
    return path


def mean_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2: stands in for frechet_distance where scipy's sqrtm of a 2048 x 2048 product (~20-30 s
    on one core, twice per evaluation) would dominate a test; it still depends on every sample's
    features. The real function is tested at full width in test_evaluation_metrics.py."""
    return float(((np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)) ** 2).sum())
