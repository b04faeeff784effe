"""nn.Modules the DiT model is built from. Parameter names match the original (timm's PatchEmbed,
Attention and Mlp), so official checkpoints load strictly. The math goes through dit_fast.dispatch,
which picks the backend; each module only remembers which backend was asked for."""
from __future__ import annotations

import torch
import torch.nn as nn

from dit_fast import dispatch


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p): a strided conv, as timm's PatchEmbed."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        for side, p in zip(self.img_size, self.patch_size):
            if side % p:
                raise ValueError(f"input size {self.img_size} is not divisible by the patch size {p}; "
                                 f"choose an input (latent) size that is a multiple of {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"DiT was built for inputs of size {self.img_size}, got {tuple(x.shape[-2:])}; "
                             f"build it with input_size=(image size // VAE downsample factor)")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's Attention, names qkv / proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = dispatch.check_attn_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        backend = dispatch.resolve_attn_backend(self.backend, x.device)
        # Views into the fused projection, no copies: (3, N, H, T, d).
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # each (N, H, T, d)
        x = dispatch.attention(q, k, v, backend)                  # (N, H, T, d)
        x = x.transpose(1, 2).reshape(N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as timm's Mlp with DiT's approximate GELU."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModulatedLayerNorm(nn.Module):
    """modulate(LayerNorm(x, no affine), shift, scale): DiT's norm + adaLN modulation, fusable.

    Holds no parameters (like the original's ``nn.LayerNorm(elementwise_affine=False)``), so the state
    dict is unchanged. ``residual_norm`` also adds the previous sublayer's gated residual first.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, fused=False):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.fused = dispatch.check_adaln_flag(fused)

    def forward(self, x, shift, scale):                           # (N, T, D), (N, D), (N, D)
        backend = dispatch.resolve_adaln_backend(self.fused, x.device)
        return dispatch.modulated_layer_norm(x, shift, scale, self.eps, backend)

    def residual_norm(self, x, gate, y, shift, scale):
        """(x + gate * y, modulate(LayerNorm(x + gate * y), shift, scale)), in one pass when fused."""
        backend = dispatch.resolve_adaln_backend(self.fused, x.device)
        return dispatch.gated_residual_norm(x, gate, y, shift, scale, self.eps, backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, fused={self.fused}"


def gated_residual(x, gate, y, fused) -> torch.Tensor:
    """x + gate * y (adaLN-Zero's gated residual), fused when ``fused`` resolves to Triton."""
    return dispatch.gated_residual(x, gate, y, dispatch.resolve_adaln_backend(fused, x.device))
