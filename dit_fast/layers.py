"""The nn.Modules a DiT is assembled from: patch embedding, self-attention, feed-forward, modulated norm.

Attribute names (``proj``, ``qkv``, ``fc1``, ``fc2``) are those of the official checkpoints, so they load
with ``strict=True``. The arithmetic itself goes through :mod:`dit_fast.dispatch`, the one place that
chooses a backend; a module only records which backend it was asked for.
"""
from __future__ import annotations

import torch
from torch import nn

from dit_fast import dispatch


def as_hw(size) -> tuple[int, int]:
    """An int or a pair -> (height, width)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class PatchEmbed(nn.Module):
    """Cut (N, C, H, W) into p x p patches and project each to D channels: (N, T, D), T = (H/p)(W/p).

    A convolution with kernel = stride = p is exactly a per-patch linear map.
    """

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = as_hw(img_size)
        self.patch_size = as_hw(patch_size)
        rows, rem_h = divmod(self.img_size[0], self.patch_size[0])
        cols, rem_w = divmod(self.img_size[1], self.patch_size[1])
        if rem_h or rem_w:
            raise ValueError(f"input size {self.img_size} is not divisible by the patch size {patch_size}; "
                             f"choose an input (latent) size that is a multiple of {patch_size}")
        self.grid_size = (rows, cols)
        self.num_patches = rows * cols
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got = tuple(x.shape[-2:])
        if got != self.img_size:
            raise ValueError(f"DiT was built for inputs of size {self.img_size}, got {got}; "
                             f"build it with input_size=(image size // VAE downsample factor)")
        grid = self.proj(x)                                  # (N, D, H/p, W/p)
        return grid.flatten(start_dim=2).transpose(1, 2)     # (N, T, D), row-major over the patch grid


class Attention(nn.Module):
    """Multi-head self-attention; q, k and v come from one fused projection ``qkv``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = dispatch.check_attn_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (N, T, D)
        backend = dispatch.resolve_attn_backend(self.backend, x.device)
        # Split the fused projection by views only: (N, T, 3D) -> (3, N, heads, T, head_dim).
        heads = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        mixed = dispatch.attention(heads[0], heads[1], heads[2], backend)   # (N, heads, T, head_dim)
        return self.proj(mixed.transpose(1, 2).flatten(start_dim=2))      # (N, T, D)


class Mlp(nn.Module):
    """The feed-forward sublayer: Linear -> GELU (tanh approximation, as DiT trains with) -> Linear."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden)


class ModulatedLayerNorm(nn.Module):
    """LayerNorm without its own affine map, followed by adaLN's x * (1 + scale) + shift.

    There are no parameters (shift and scale are regressed from the conditioning), so adding this module
    changes no state-dict key. ``backend`` "torch" | "triton" | "auto" picks the ops (dit_fast.dispatch).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend="torch"):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = float(eps)
        self.backend = dispatch.adaln_backend_name(backend)

    def _backend(self, device: torch.device) -> str:
        return dispatch.resolve_adaln_backend(self.backend, device)

    def forward(self, x, shift, scale):                          # (N, T, D), (N, D), (N, D) -> (N, T, D)
        return dispatch.modulated_layer_norm(x, shift, scale, self.eps, self._backend(x.device),
                                             gemm_input_dtype(x))

    def residual_norm(self, x, gate, y, shift, scale):
        """h = x + gate * y and this norm applied to h, returned as (h, norm(h)); one pass when fused."""
        return dispatch.gated_residual_norm(x, gate, y, shift, scale, self.eps, self._backend(x.device),
                                            gemm_input_dtype(x))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, backend={self.backend}"


def gemm_input_dtype(x: torch.Tensor):
    """The dtype autocast will cast the norm's output to for the next Linear (None: no autocast here).

    The fused adaLN ops then write that dtype directly (bit-identical to autocast's round-to-nearest
    cast of the fp32 result), saving a cast kernel each way per norm.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def gated_residual(x, gate, y, backend) -> torch.Tensor:
    """adaLN-Zero's residual x + gate * y; (N, T, D), (N, D), (N, T, D). Triton when ``backend`` says so."""
    return dispatch.gated_residual(x, gate, y, dispatch.resolve_adaln_backend(backend, x.device))


def keep_outputs_of_matmuls_over(k: int):
    """A selective-checkpointing context: keep the output of every matmul that contracts over ``k``
    (a DiT block's fc2: K = mlp hidden width), recompute everything else in the backward.

    fc2's output is cheap to keep (one (N, T, D) tensor) and its GEMM is the costliest single
    recompute per byte; it is needed only by the gated residual's
    backward. Recomputing the rest re-runs exactly the same ops, so gradients are bit-identical.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    aten = torch.ops.aten

    def policy(ctx, func, *args, **kwargs):
        if func in (aten.addmm.default, aten.mm.default):
            a = args[1] if func is aten.addmm.default else args[0]  # (M, K) @ (K, N)
            if a.shape[-1] == k:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
