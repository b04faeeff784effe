"""The TensorFlow-2015 Inception-v3 (the FID network) as torch-fidelity ports it, with ADM's three outputs.

Our own module, not an import of torch-fidelity's: `import torch_fidelity` runs its package __init__,
which imports torchvision (unusable beside a CPU torch on some machines); its constructor unpickles the
weights file with weights_only=False and downloads when no path is given; and it has no output for the
spatial features sFID needs. Parameter names equal torch-fidelity's, so its converted weights file
(weights-inception-2015-12-05-6726825d.pth) loads here with strict=True; tests/test_evaluation_inception.py
proves the outputs equal torch-fidelity's FeatureExtractorInceptionV3 on the same random weights.

TF-graph quirks kept (they are the 2015 graph's, and FID's numbers depend on them): bilinear resize to
299 with TF1's corner alignment, (x - 128) / 128 input scaling, BatchNorm eps 1e-3, average pools that
ignore padding, a max pool in the last block's pool branch, and a 1008-way classifier.

    net = InceptionV3(); net.load_state_dict(torch.load(path, weights_only=True))
    pool, spatial, logits = net(images_uint8_nchw)   # (N, 2048), (N, 2023), (N, 1008) float32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv:0 (= Mixed_6d.branch1x1 here), its first 7 channels


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's resize_bilinear (align_corners=False, no half-pixel centres) of (N, C, H, W) floats.

    Output pixel i samples the input at i * (in / out): the top-left corners align, unlike
    F.interpolate's half-pixel grid. The lerps run in x's dtype in TF's order (rows, then columns).
    """
    def axis(n_in: int):
        src = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=x.dtype)
        lo = src.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, src - lo.to(x.dtype)

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU; the unit every branch is built from."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, inp):
        return F.relu(self.bn(self.conv(inp)))


def _row(cin, cout):  # a (1, 3) or (1, 7) kernel: same-size padding along the width only
    return lambda size: BasicConv2d(cin, cout, (1, size), padding=(0, size // 2))


def _col(cin, cout):
    return lambda size: BasicConv2d(cin, cout, (size, 1), padding=(size // 2, 0))


def _avg_pool_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _run(inp, *units):
    for unit in units:
        inp = unit(inp)
    return inp


class Mixed35(nn.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_out, 1)

    def forward(self, inp):
        return torch.cat([self.branch1x1(inp), _run(inp, self.branch5x5_1, self.branch5x5_2),
                          _run(inp, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool_same(inp))], 1)


class Reduce35(nn.Module):
    """35x35 -> 17x17 (TF mixed_3): stride-2 3x3 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, inp):
        return torch.cat([self.branch3x3(inp),
                          _run(inp, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(inp, 3, stride=2)], 1)


class Mixed17(nn.Module):
    """17x17 block (TF mixed_4..mixed_7): 1x1 | factorised 7x7 | double factorised 7x7 | avg pool-1x1."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            BasicConv2d(cin, mid, 1), _row(mid, mid)(7), _col(mid, 192)(7))
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = (
            BasicConv2d(cin, mid, 1), _col(mid, mid)(7), _row(mid, mid)(7))
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _col(mid, mid)(7), _row(mid, 192)(7)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def branches(self, x) -> list[torch.Tensor]:
        """The four branch outputs, 1x1 first (its output is TF's mixed_N/conv)."""
        return [self.branch1x1(x), _run(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _run(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5),
                self.branch_pool(_avg_pool_same(x))]

    def forward(self, inp):
        return torch.cat(self.branches(inp), 1)


class Reduce17(nn.Module):
    """17x17 -> 8x8 (TF mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(cin, 192, 1), _row(192, 192)(7)
        self.branch7x7x3_3, self.branch7x7x3_4 = _col(192, 192)(7), BasicConv2d(192, 192, 3, stride=2)

    def forward(self, inp):
        return torch.cat([_run(inp, self.branch3x3_1, self.branch3x3_2),
                          _run(inp, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                               self.branch7x7x3_4),
                          F.max_pool2d(inp, 3, stride=2)], 1)


class Mixed8(nn.Module):
    """8x8 block (TF mixed_9, mixed_10): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    The 2015 graph pools with an average in mixed_9 and a MAX in mixed_10 (`max_pool`)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _row(384, 384)(3), _col(384, 384)(3)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _row(384, 384)(3), _col(384, 384)(3)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, inp):
        a = self.branch3x3_1(inp)
        b = _run(inp, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(inp, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(inp)
        return torch.cat([self.branch1x1(inp), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The 2015 graph (module names = torch-fidelity's); forward gives ADM's pool_3, spatial and logits."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = Mixed35(192, 32), Mixed35(256, 64), Mixed35(288, 64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b, self.Mixed_6c = Mixed17(768, 128), Mixed17(768, 160)
        self.Mixed_6d, self.Mixed_6e = Mixed17(768, 160), Mixed17(768, 192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b, self.Mixed_7c = Mixed8(1280, max_pool=False), Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 (N, 3, H, W) -> pool_3 (N, 2048), spatial (N, 17*17*7 = 2023, in TF's HWC order),
        unbiased logits (N, 1008): pool_3 @ fc.weight.T, the logits ADM's Inception Score softmaxes."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = _run(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)                                          # (N, 64, 73, 73)
        x = _run(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)                                          # (N, 192, 35, 35)
        x = _run(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)
        parts = self.Mixed_6d.branches(x)                                         # 4 x (N, 192, 17, 17)
        spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)   # (N, 2023)
        x = _run(torch.cat(parts, 1), self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)                             # (N, 2048)
        return pool, spatial, pool @ self.fc.weight.T
