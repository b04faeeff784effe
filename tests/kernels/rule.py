"""Shared by the adaLN kernel tests: flash-attention's accuracy rule and the common constants."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The floor, relative to max|gold|, only absorbs round-off where PyTorch's own error happens to be tiny;
# 1e-3 for both half types (flash-attention's), so a kernel 1% off everywhere fails (test_rule.py).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
TINY_TILES = dict(block_t=4, rows_per_program=8)  # multi-tile loops and chunk tails in the interpreter


def assert_rule(name, out, gold, base, dtype):
    """err(out) <= 2 * err(base) + floor, both against gold; says where and how much on failure."""
    err = (out.double() - gold).abs()
    base_err = (base.double() - gold).abs().max().item()
    bound = 2 * base_err + FLOOR[dtype] * max(1.0, gold.abs().max().item())
    worst = err.max().item()
    if not worst <= bound:  # also catches NaN
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{name} ({dtype}): max error {worst:.3e} at {idx} (got {out[idx].item():.6g}, "
                             f"want {gold[idx].item():.6g}) > bound {bound:.3e} (torch's own error "
                             f"{base_err:.3e})")
