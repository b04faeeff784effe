"""dit_fast_kernels: Triton kernels for DiT (fused adaLN modulation, gated residuals, flash attention).

Each op lives in its own file with the same anatomy: readable torch reference -> Triton kernels ->
launcher -> autograd wrapper registered as a torch op (namespace ``dit_fast``; the adaLN ops as
``torch.library.triton_op`` so inductor sees their kernels) -> public function. adaln_tiles.py holds
what the adaLN ops share (tile helpers, launch configs of both layouts, input checks).
Importing this package never touches CUDA and works without Triton installed; ``triton_status`` says
whether the Triton kernels can run on a given device. This package never imports ``dit_fast``.
"""
from dit_fast_kernels.flash_attention import flash_attention
from dit_fast_kernels.gated_residual import gated_residual
from dit_fast_kernels.gated_residual_norm import gated_residual_norm
from dit_fast_kernels.modulated_layer_norm import modulated_layer_norm
from dit_fast_kernels.runtime import triton_status

__all__ = ["flash_attention", "gated_residual", "gated_residual_norm", "modulated_layer_norm", "triton_status"]
