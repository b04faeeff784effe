"""Shared test set-up. On a machine without CUDA the Triton kernels run in Triton's interpreter, which
must be switched on before anything imports triton: that is done here, before any test module loads.

Triton is part of the test environment (`make test` installs it): without it the run stops with an
error instead of silently skipping every kernel test. DIT_FAST_ALLOW_NO_TRITON=1 lets a deliberately
triton-less environment run the rest, with the kernel tests skipped.
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ALLOW_NO_TRITON = os.environ.get("DIT_FAST_ALLOW_NO_TRITON") == "1"


def pytest_configure(config):
    if importlib.util.find_spec("triton") is None and not ALLOW_NO_TRITON:
        raise pytest.UsageError(
            "triton is not installed, so the kernel tests cannot run: install it (`make test` does, "
            "`pip install triton`), or set DIT_FAST_ALLOW_NO_TRITON=1 to skip them on purpose")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny ops on a shared 2-core machine run ~50x slower with
    OpenMP's spinning threads than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
