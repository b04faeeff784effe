"""Shared test set-up. On a machine without CUDA the Triton kernels run in Triton's interpreter, which
must be switched on before anything imports triton: that is done here, before any test module loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
