"""REPA (Yu et al., 2025): representation alignment on the fast DiT backbone.

``SILoss`` is REPA's objective with REPA's interface; ``build_projector`` / ``REPAModel`` tap the DiT
after block ``encoder_depth``; ``load_encoder`` gives the frozen DINOv2 and its patch tokens.
"""
from .encoder import DINOv2Encoder, encoder_input_size, load_encoder, preprocess_raw_image
from .loss import SILoss, alignment_loss, mean_flat
from .projector import REPAModel, build_projector

__all__ = ["SILoss", "alignment_loss", "mean_flat", "build_projector", "REPAModel", "DINOv2Encoder",
           "load_encoder", "preprocess_raw_image", "encoder_input_size"]
