"""Where Triton kernels can run: CUDA devices, or the CPU under Triton's interpreter."""
import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 (must be set before triton is first imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status(device) -> tuple[bool, str]:
    """(available, reason): can the Triton kernels run on ``device``? ``reason`` says what is missing."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton, or pip install 'dit-fast[triton]')"
    if device.type == "cuda":
        return True, "cuda"
    if device.type == "cpu":
        if interpreter_enabled():
            return True, "cpu (Triton interpreter, TRITON_INTERPRET=1)"
        return False, ("Triton kernels need a CUDA GPU; on a CPU they run only in Triton's interpreter "
                       "(set TRITON_INTERPRET=1 before anything imports triton)")
    return False, f"Triton kernels do not support device type '{device.type}'"
