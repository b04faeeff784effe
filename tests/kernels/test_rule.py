"""The accuracy rule itself can fail: a result 1% off everywhere does, honest bf16/fp16 rounding does not."""
import pytest
import torch

from tests.kernels.rule import assert_rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rule_passes_rounding_and_catches_one_percent(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 333, generator=gen, dtype=torch.float64)
    gold = torch.tanh(x) * 3 + x  # (64, 333) float64
    base = (torch.tanh(x.to(dtype)) * 3 + x.to(dtype))  # PyTorch in the dtype: a few roundings
    assert_rule("rounded once", gold.to(dtype), gold, base, dtype)
    with pytest.raises(AssertionError, match="max error"):
        assert_rule("1% off", (gold * 1.01).to(dtype), gold, base, dtype)
