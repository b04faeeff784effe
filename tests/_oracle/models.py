"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2022), in the paper's reading order:
embedders -> DiT block (adaLN-Zero) -> final layer -> DiT -> positional embeddings -> size table.

Plain single-device PyTorch. Parameter names and initialisation match the original implementation, so
the official checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) load with ``strict=True`` and give the
same outputs. Speed switches are keyword arguments that keep the numbers (up to floating-point
tolerance): ``attn_backend`` (see dit_fast.dispatch), ``fused_adaln`` (Triton adaLN kernels) and
``grad_checkpointing`` (activation checkpointing of all blocks, or a fraction of them).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import Attention, Mlp, ModulatedLayerNorm, PatchEmbed, _pair, gated_residual


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal frequencies, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(N,) timesteps (may be fractional) -> (N, dim) [cos | sin] embeddings, always computed in fp32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                  # (N, half); t is never rounded to bf16
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Under DeepSpeed bf16 the weights are bf16: the embedding is computed in fp32, then cast once.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row ``num_classes`` is the "no class" label for classifier-free guidance;
    during training labels are dropped to it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A transformer block with adaptive LayerNorm-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn_backend: str = "sdpa", fused_adaln=False):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, fused=fused_adaln)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, backend=attn_backend)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=1e-6, fused=fused_adaln)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:   # (N, T, D), (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        a = self.attn(self.norm1(x, shift_msa, scale_msa))                  # (N, T, D)
        # x = x + gate_msa * a, and the MLP's modulated norm of it (one pass when fused)
        x, h = self.norm2.residual_norm(x, gate_msa, a, shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.mlp(h), self.norm2.fused)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map to patch_size**2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, fused_adaln=False):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, eps=1e-6, fused=fused_adaln)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x, shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Original arguments and defaults. ``input_size`` is the latent (or pixel) size, an int or (H, W), each
    divisible by ``patch_size``. ``num_classes`` is any count; the "no class" label used by guidance is
    ``num_classes`` itself. For unconditional models use ``num_classes=1`` and labels of 0.
    Extra keyword arguments (speed only, numbers unchanged): ``attn_backend`` ("sdpa", "math", "triton",
    "flash_attn", "xformers", "auto"), ``fused_adaln`` (True/False/"auto"), ``grad_checkpointing``
    (True/False or the fraction of blocks, counted from the first, to checkpoint).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, *,
                 attn_backend: str = "sdpa", fused_adaln=False, grad_checkpointing=0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (use 1 for an unconditional model), got {num_classes}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2-D sin-cos embedding, stored as a frozen parameter (it is in the official checkpoints).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend=attn_backend, fused_adaln=fused_adaln)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, fused_adaln=fused_adaln)
        self.initialize_weights()
        self.set_grad_checkpointing(grad_checkpointing)

    def initialize_weights(self) -> None:
        """The original initialisation: xavier linears, sin-cos pos_embed, adaLN-Zero (zeroed modulation)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data                    # initialise the patch conv like a linear
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:                               # adaLN-Zero: every block starts as identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # -- speed switches (numbers unchanged) ------------------------------------------------------

    def set_grad_checkpointing(self, enable=True) -> None:
        """Checkpoint all blocks (True), none (False/0) or the first ``round(fraction * depth)`` blocks."""
        fraction = float(enable)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"grad_checkpointing must be a bool or a fraction in [0, 1], got {enable!r}")
        n_ckpt = round(fraction * len(self.blocks))
        for i, block in enumerate(self.blocks):
            block.grad_checkpointing = i < n_ckpt

    def set_backends(self, attn_backend: str | None = None, fused_adaln=None) -> None:
        """Switch the attention backend and/or the fused adaLN kernels of a built model."""
        from dit_fast import dispatch
        for module in self.modules():
            if attn_backend is not None and isinstance(module, Attention):
                module.backend = dispatch.check_attn_backend_name(attn_backend)
            if fused_adaln is not None and isinstance(module, ModulatedLayerNorm):
                module.fused = dispatch.check_adaln_flag(fused_adaln)

    # -- forward ---------------------------------------------------------------------------------

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) images or latents, t (N,) diffusion timesteps, y (N,) class labels."""
        x = self.x_embedder(x) + self.pos_embed               # (N, T, D), T = H * W / patch_size ** 2
        t = self.t_embedder(t)                                # (N, D)
        y = self.y_embedder(y, self.training)                 # (N, D)
        c = t + y                                             # (N, D)
        for block in self.blocks:
            if block.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)                               # (N, T, D)
        x = self.final_layer(x, c)                            # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x)                             # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
        """Forward for classifier-free guidance: the batch is [conditional half, unconditional half].

        As in the original, guidance is applied to the first three channels only (a quirk kept so that
        samples match the published ones); ``guide_all_channels=True`` guides every input channel.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        n_guided = self.in_channels if guide_all_channels else 3
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                     Sine/cosine positional embeddings (MAE)                   #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size) -> np.ndarray:
    """(gh * gw, embed_dim) float64: the first half of the channels encodes the column (w) coordinate,
    the second half the row, as MAE / the original DiT do."""
    gh, gw = _pair(grid_size)
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack([grid_w, grid_h], axis=0).reshape(2, 1, gh, gw)  # MAE puts w first; kept for checkpoints
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (gh*gw, D/2)
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (gh*gw, D/2)
    return np.concatenate([emb_a, emb_b], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) [sin | cos], frequencies 1 / 10000^(2i/D) in float64."""
    if embed_dim % 2:
        raise ValueError(f"positional embedding width must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                     # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)                # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT configs                                 #
#################################################################################

_SIZES = {  # name -> (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _make_config(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)
    return build


DiT_models = {
    f"DiT-{size}/{p}": _make_config(*_SIZES[size], p) for size in ("XL", "L", "B", "S") for p in (2, 4, 8)
}


def patch_size_of(name: str) -> int:
    """The patch size of a DiT_models name ("DiT-XL/2" -> 2); the one place a model name is parsed."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    return int(name.rsplit("/", 1)[1])


def build_model(name: str, *, depth=None, hidden_size=None, num_heads=None, **kwargs) -> DiT:
    """DiT_models[name](**kwargs) with a clear error for an unknown name. ``depth`` / ``hidden_size`` /
    ``num_heads`` (None: the named size) override the size for custom models, keeping the patch size."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    if depth is None and hidden_size is None and num_heads is None:
        return DiT_models[name](**kwargs)
    size = name[len("DiT-"):].split("/")[0]
    named_depth, named_hidden, named_heads = _SIZES[size]
    return DiT(depth=depth or named_depth, hidden_size=hidden_size or named_hidden,
               num_heads=num_heads or named_heads, patch_size=patch_size_of(name), **kwargs)
