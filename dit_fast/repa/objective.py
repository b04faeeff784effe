"""REPA as a training objective of train.py (dit_fast.train.objective's "repa" entry).

    --repa --enc-type dinov2-vit-b --encoder PATH_OR_ID --encoder-depth 8 --proj-coeff 0.5

The engine trains ``REPAModel(dit, [projector])`` (``wrap_model``): the projector's weights go
through the same optimizer, ZeRO partitioning, EMA and checkpoint as the DiT's. The frozen encoder is
the objective's own (never the engine's): it runs inside the step on the batch's uint8 images, under
no_grad, so it takes no optimizer state and receives no gradient. The per-sample loss handed to
TrainStep is ``denoising + proj_coeff * proj_loss`` (its mean is REPA's ``loss_mean + proj_coeff *
proj_loss_mean``); the alignment term is also kept on the device for its own log field.
"""
from __future__ import annotations

from typing import Callable

import torch

from .encoder import encoder_config, encoder_input_size, load_encoder
from .loss import SILoss
from .projector import REPAModel, build_projector


class RepaObjective:
    """REPA's SILoss on REPAModel's (velocity, projections) with a frozen DINOv2 encoder."""

    needs_images = True

    def __init__(self, cfg):
        r = cfg.repa
        self.silos = SILoss(prediction="v", path_type=r.repa_path_type, weighting=r.weighting)
        self.proj_coeff = float(r.proj_coeff)
        self.encoder = load_encoder(r.enc_type, r.encoder, resolution=cfg.model.image_size)
        self._proj_sum, self._proj_count, self._device = None, 0, torch.device("cpu")

    @staticmethod
    def check(cfg, info) -> None:
        """Images beside the data, a block the model has, an encoder that is there: before anything runs."""
        from .. import models
        r, m = cfg.repa, cfg.model
        if not getattr(info, "has_images", False):
            raise ValueError(f"--repa needs the uint8 images beside the latents, and --features-path "
                             f"{cfg.data.features_path!r} has none; extract them with "
                             "extract_features.py --keep-images (or train from --data-path)")
        depth = m.depth or models._SIZES[m.model[len("DiT-"):].split("/")[0]][0]
        if r.encoder_depth > depth:
            raise ValueError(f"--encoder-depth {r.encoder_depth} is past the model's last block "
                             f"({m.model} has {depth})")
        patch = int(encoder_config(r.enc_type, r.encoder).patch_size)
        enc_tokens = (encoder_input_size(m.image_size) // patch) ** 2
        dit_tokens = (m.input_size // m.patch_size) ** 2
        if enc_tokens != dit_tokens:
            raise ValueError(f"--repa aligns token by token, but {m.model} makes {dit_tokens} tokens of its "
                             f"{m.input_size}x{m.input_size} input and the encoder {enc_tokens} of a "
                             f"{m.image_size} px image; pick a --model patch size that matches (DiT-*/2 on "
                             "SD-VAE latents: 256 and 256 at 256 px)")

    @staticmethod
    def wrap_model(cfg, dit: torch.nn.Module) -> REPAModel:
        """The DiT with REPA's projector (to the encoder's width) after block encoder_depth."""
        r = cfg.repa
        z_dim = int(encoder_config(r.enc_type, r.encoder).hidden_size)
        hidden = dit.pos_embed.shape[-1]
        return REPAModel(dit, [build_projector(hidden, r.projector_dim, z_dim)], r.encoder_depth)

    def loss(self, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, images=None) -> torch.Tensor:
        if images is None:
            raise ValueError("the REPA objective needs the batch's images")
        self.encoder.to(x.device)                               # a no-op after the first step
        self._device = x.device
        zs = [self.encoder(images.to(x.device, non_blocking=True))]   # (N, T, D), no grad
        denoising, proj = self.silos(model_fn, x, dict(y=y), zs)
        detached = proj.detach().double()
        self._proj_sum = detached if self._proj_sum is None else self._proj_sum + detached
        self._proj_count += 1
        return denoising + self.proj_coeff * proj               # (N,): mean = loss + coeff * proj

    def extra_metrics(self, world: int) -> dict:
        """{"proj_loss": mean over ranks and micro-steps since the last call}. Collective (all ranks)."""
        import torch.distributed as dist
        total = self._proj_sum if self._proj_sum is not None else torch.zeros(
            (), dtype=torch.float64, device=self._device)
        total = total.reshape(1).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        count = max(self._proj_count, 1) * world
        self._proj_sum, self._proj_count = None, 0
        return {"proj_loss": float(total) / count}

