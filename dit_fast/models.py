"""DiT, "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2022), in the paper's order:
conditioning embedders -> the adaLN-Zero block -> the final layer -> the model -> positional embedding ->
the model sizes of Table 1.

Plain single-device PyTorch. Module and parameter names, and the order of every random draw of the
initialisation, are those of the published checkpoints' code: DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt
load with ``strict=True``, and a seeded constructor gives the same initial weights. Speed switches keep
the numbers up to floating-point tolerance: ``attn_backend`` (see dit_fast.dispatch), ``adaln_backend``
(the Triton adaLN kernels; ``fused_adaln`` is its documented alias) and ``grad_checkpointing`` (activation checkpointing of some or all blocks).
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import Module
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from dit_fast.layers import (Attention, Mlp, ModulatedLayerNorm, PatchEmbed, as_hw, gated_residual,
                             keep_outputs_of_matmuls_over)


# -- conditioning: the noise level t and the class label y ----------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """(N,) timesteps, possibly fractional -> (N, dim) float32 features [cos(t w_k) | sin(t w_k)]
    with frequencies w_k = max_period ** (-k / (dim // 2)); an odd ``dim`` gets one zero column.

    Always float32, whatever the model's dtype: t = 998 and 999 are one number in bf16.
    """
    n_freqs = dim // 2
    k = torch.arange(n_freqs, dtype=torch.float32, device=t.device)
    freqs = torch.exp(k * -math.log(max_period) / n_freqs)       # (dim/2,), from 1 down to ~1/max_period
    angles = t.float().unsqueeze(1) * freqs.unsqueeze(0)           # (N, dim/2)
    features = torch.cat((angles.cos(), angles.sin()), dim=1)      # (N, 2 * (dim/2))
    if dim % 2:
        features = nn.functional.pad(features, (0, 1))
    return features


class TimestepEmbedder(Module):
    """t -> (N, D): sinusoidal features of t, then a two-layer MLP with a SiLU between."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.freq_dim = frequency_embedding_size
        D = hidden_size
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.freq_dim)
        # The features stay exact in fp32 and are rounded once to the weights' dtype (bf16 under DeepSpeed).
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(Module):
    """y -> (N, D), a table lookup. The extra row ``num_classes`` is the null label: training replaces a
    label by it with probability ``dropout_prob``, which is what lets classifier-free guidance work."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        rows = num_classes + 1 if dropout_prob > 0 else num_classes
        self.embedding_table = nn.Embedding(rows, hidden_size)
        self.null_label = num_classes            # index of the extra row
        self.dropout_prob = float(dropout_prob)

    def drop_labels(self, y: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        """y with the null label where ``force_drop_ids == 1`` or, without it, at random."""
        if force_drop_ids is not None:
            return y.masked_fill(force_drop_ids == 1, self.null_label)
        dropped = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        return y.masked_fill(dropped, self.null_label)

    def forward(self, y: torch.Tensor, train: bool, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            y = self.drop_labels(y, force_drop_ids)
        return self.embedding_table(y)


# -- the transformer --------------------------------------------------------------------------------

class DiTBlock(Module):
    """Self-attention and MLP sublayers, both conditioned by adaLN-Zero: from c the block regresses a
    shift and scale for each LayerNorm and a gate for each residual branch (zero at init)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn_backend: str = "sdpa", adaln_backend: str = "torch"):
        super().__init__()
        D = hidden_size
        self.norm1 = ModulatedLayerNorm(D, eps=1e-6, backend=adaln_backend)
        self.attn = Attention(D, num_heads=num_heads, qkv_bias=True, backend=attn_backend)
        self.norm2 = ModulatedLayerNorm(D, eps=1e-6, backend=adaln_backend)
        self.mlp = Mlp(in_features=D, hidden_features=int(D * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.grad_checkpointing = False
        self.checkpoint_policy = "full"    # or "selective": keep fc2's output, recompute the rest

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:   # (N, T, D), (N, D)
        if self.grad_checkpointing and self.checkpoint_policy == "selective" and self.training \
                and torch.is_grad_enabled():
            # Inside forward, so that a compiled block traces the policy (inductor's partitioner obeys it).
            context = partial(keep_outputs_of_matmuls_over, self.mlp.fc2.in_features)
            return activation_checkpoint(self.sublayers, x, c, use_reentrant=False, context_fn=context)
        return self.sublayers(x, c)

    def sublayers(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)                     # six (N, D)
        attn_shift, attn_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate = mod
        attn_out = self.attn(self.norm1(x, attn_shift, attn_scale))        # (N, T, D)
        # x += attn_gate * attn_out, and the MLP's modulated norm of the new x, in one pass when fused.
        x, mlp_in = self.norm2.residual_norm(x, attn_gate, attn_out, mlp_shift, mlp_scale)
        return gated_residual(x, mlp_gate, self.mlp(mlp_in), self.norm2.backend)


class FinalLayer(Module):
    """Modulated LayerNorm, then a linear map of each token to its patch: p * p * out_channels values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln_backend: str = "torch"):
        super().__init__()
        D = hidden_size
        self.norm_final = ModulatedLayerNorm(D, eps=1e-6, backend=adaln_backend)
        self.linear = nn.Linear(D, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:   # (N, T, D) -> (N, T, p*p*C)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)   # (N, D) each
        return self.linear(self.norm_final(x, shift, scale))


class DiT(Module):
    """The Diffusion Transformer: noised input x, timestep t and label y -> noise (and variance) estimate.

    Arguments and defaults are the original's. ``input_size`` is the latent (or pixel) side, an int or
    (H, W), divisible by ``patch_size``. With ``learn_sigma`` the output has 2 * in_channels channels:
    the noise, then the variance interpolation values. Labels run over ``num_classes``; the null label
    of guidance is ``num_classes`` itself (an unconditional model: ``num_classes=1``, labels 0).
    Speed only, the numbers unchanged: ``attn_backend`` ("sdpa", "math", "triton", "flash_attn",
    "xformers", "auto"), ``adaln_backend`` ("torch", "triton", "auto"; or its alias ``fused_adaln``
    True/False/"auto"), ``grad_checkpointing`` (True/False, "selective", or the
    fraction of blocks, counted from the first, to checkpoint).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, *,
                 attn_backend: str = "sdpa", adaln_backend: str = "torch", fused_adaln=None,
                 grad_checkpointing=0.0):
        super().__init__()
        from dit_fast.dispatch import adaln_backend_name
        adaln_backend = adaln_backend_name(adaln_backend if fused_adaln is None else fused_adaln)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (use 1 for an unconditional model), got {num_classes}")
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.in_channels, self.out_channels = in_channels, (2 if learn_sigma else 1) * in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        # Submodules are created in the original's order: each constructor draws its default init.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_chans=in_channels, embed_dim=hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size=256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, dropout_prob=class_dropout_prob)
        # The fixed sin-cos embedding is a frozen parameter because the official checkpoints store it.
        n_tokens = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend=attn_backend, adaln_backend=adaln_backend)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaln_backend=adaln_backend)
        self.reset_parameters()
        self.set_grad_checkpointing(grad_checkpointing)

    def reset_parameters(self) -> None:
        """DiT's initialisation, draws in the original order: Xavier-uniform linears (module order), the
        sin-cos positions, the patch projection as a linear, N(0, 0.02) embeddings, then adaLN-Zero."""
        for linear in [m for m in self.modules() if isinstance(m, nn.Linear)]:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        positions = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        patch_proj = self.x_embedder.proj
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(positions).float()[None])
            nn.init.xavier_uniform_(patch_proj.weight.flatten(1))  # the fans of a (D, C*p*p) linear map
        nn.init.zeros_(patch_proj.bias)
        for weight in (self.y_embedder.embedding_table.weight,
                       self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(weight, std=0.02)
        # adaLN-Zero: zero modulation makes every block the identity, and a zero output layer predicts 0.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # -- speed switches (the numbers do not change) --

    def set_grad_checkpointing(self, enable=True) -> None:
        """Checkpoint every block (True), none (False / 0) or the first ``round(fraction * depth)``;
        "selective": every block, keeping each fc2 output and recomputing the rest."""
        policy = "selective" if enable == "selective" else "full"
        fraction = 1.0 if policy == "selective" else _fraction(enable)
        n_checkpointed = round(fraction * len(self.blocks))
        for index, block in enumerate(self.blocks):
            block.grad_checkpointing = index < n_checkpointed
            block.checkpoint_policy = policy

    # -- forward --

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) per-token patches -> (N, C, H, W) image."""
        p, _ = self.x_embedder.patch_size
        rows, cols = self.x_embedder.grid_size
        patches = x.unflatten(1, (rows, cols)).unflatten(-1, (p, p, self.out_channels))  # (N, h, w, p, p, C)
        image = patches.permute(0, 5, 1, 3, 2, 4)                                # (N, C, h, p, w, p)
        return image.reshape(x.shape[0], self.out_channels, rows * p, cols * p)

    def _run_block(self, block: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if block.grad_checkpointing and block.checkpoint_policy == "full" and self.training \
                and torch.is_grad_enabled():
            return activation_checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_hidden_at: int | None = None):
        """x (N, C, H, W) noised images or latents, t (N,) diffusion timesteps, y (N,) class labels.

        With ``return_hidden_at=k`` (1-based) also returns the (N, T, D) tokens after the first k blocks
        (REPA's alignment tap): ``(output, hidden)``; the output itself is unchanged."""
        if return_hidden_at is not None and not 1 <= return_hidden_at <= len(self.blocks):
            raise ValueError(f"return_hidden_at must be in [1, {len(self.blocks)}], got {return_hidden_at}")
        tokens = self.x_embedder(x) + self.pos_embed               # (N, T, D), T = H * W / p**2
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        hidden = None
        for depth, blk in enumerate(self.blocks, start=1):
            tokens = self._run_block(blk, tokens, c)               # (N, T, D)
            if depth == return_hidden_at:
                hidden = tokens
        patches = self.final_layer(tokens, c)                      # (N, T, p * p * out_channels)
        out = self.unpatchify(patches)                             # (N, out_channels, H, W)
        return out if return_hidden_at is None else (out, hidden)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
        """Classifier-free guidance. The batch is [conditional half, unconditional half] (labels y and
        the null label); both halves are run on the first half of x and the noise estimate becomes
        eps_null + cfg_scale * (eps_y - eps_null), the same for both halves.

        Only the first three channels are guided, a quirk of the original kept so that samples match the
        published ones; ``guide_all_channels=True`` guides every input channel.
        """
        n_cond = len(x) // 2
        x_half = x[:n_cond]
        out = self.forward(torch.cat([x_half, x_half]), t, y)      # (2 * n_cond, out_channels, H, W)
        n_guided = self.in_channels if guide_all_channels else 3
        eps_y, eps_null = out[:, :n_guided].chunk(2)
        guided = eps_null + cfg_scale * (eps_y - eps_null)
        return torch.cat([torch.cat([guided, guided]), out[:, n_guided:]], dim=1)


def _fraction(enable) -> float:
    try:
        fraction = float(enable)
    except (TypeError, ValueError):
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"grad_checkpointing must be a bool, a fraction in [0, 1] or 'selective', got {enable!r}")
    return fraction


# -- fixed 2-D sin-cos positional embedding -----------------------------------------------------------

def sincos_pos_embed_2d(width: int, grid_size) -> np.ndarray:
    """(rows * cols, width) float64 positions of a row-major token grid: the first half of the channels
    encodes the column index, the second half the row index (the layout of the published weights)."""
    rows, cols = as_hw(grid_size)
    col_index = np.tile(np.arange(cols, dtype=np.float64), rows)      # token k = r * cols + c -> c
    row_index = np.repeat(np.arange(rows, dtype=np.float64), cols)    # -> r
    half = width // 2
    return np.concatenate([sincos_embed_1d(half, col_index), sincos_embed_1d(half, row_index)], axis=1)


def sincos_embed_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, width) float64 [sin(pos w_k) | cos(pos w_k)], w_k = 10000 ** (-2k / width)."""
    if width % 2:
        raise ValueError(f"positional embedding width must be even, got {width}")
    exponent = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
    angles = np.outer(positions, 1.0 / 10000 ** exponent)              # (M, width/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


# -- model sizes (DiT Table 1) ----------------------------------------------------------------------

# name -> (depth, hidden_size, num_heads)
_SIZES = dict(XL=(28, 1152, 16), L=(24, 1024, 16), B=(12, 768, 12), S=(12, 384, 6))
_PATCH_SIZES = (2, 4, 8)


def _size_builder(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)
    return build


DiT_models = {f"DiT-{size}/{p}": _size_builder(*_SIZES[size], p) for size in _SIZES for p in _PATCH_SIZES}


def _check_name(name: str) -> None:
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")


def patch_size_of(name: str) -> int:
    """The patch size of a DiT_models name ("DiT-XL/2" -> 2); the one place a model name is parsed."""
    _check_name(name)
    return int(name.rsplit("/", 1)[1])


def build_model(cfg, **overrides) -> DiT:
    """The DiT of a resolved ``ModelConfig`` (dit_fast.config; ``in_channels`` and ``input_size`` set):
    the one builder of training, sampling, export and the demo. ``depth`` / ``hidden_size`` /
    ``num_heads`` (None: the named size) override the size for custom models, keeping the patch
    size; ``overrides`` replace constructor arguments (e.g. ``class_dropout_prob=0.0``)."""
    _check_name(cfg.model)
    if cfg.in_channels is None or cfg.input_size is None:
        raise ValueError(f"the model config of {cfg.model} is not resolved: in_channels="
                         f"{cfg.in_channels}, input_size={cfg.input_size} (derived from the data / VAE)")
    named_depth, named_width, named_heads = _SIZES[cfg.model[len("DiT-"):].split("/")[0]]
    kwargs = dict(input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                  learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout_prob,
                  attn_backend=cfg.attn_backend, adaln_backend=cfg.adaln_backend,
                  grad_checkpointing=cfg.grad_checkpointing, depth=cfg.depth or named_depth,
                  hidden_size=cfg.hidden_size or named_width, num_heads=cfg.num_heads or named_heads,
                  patch_size=patch_size_of(cfg.model))
    return DiT(**{**kwargs, **overrides})
