"""dit_fast.dispatch: flag validation normalises bool-like values (0 means off, everywhere)."""
import pytest
import torch

from dit_fast import dispatch


@pytest.mark.parametrize("value, want", [
    (True, True), (False, False), (1, True), (0, False), ("auto", "auto"), ("AUTO", "auto"),
    ("true", True), ("False", False), ("1", True), ("0", False), (" TRUE ", True),
])
def test_adaln_flag_is_normalised(value, want):
    got = dispatch.check_adaln_flag(value)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", [2, -1, 0.0, 1.0, None, "maybe", "yes", "", [True]])
def test_adaln_flag_rejects_the_rest(value):
    with pytest.raises(ValueError, match="fused_adaln must be"):
        dispatch.check_adaln_flag(value)


def test_zero_turns_the_triton_path_off(monkeypatch):
    """0 used to reach the Triton branch (0 is not False) and then shared False's cache entry."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    assert dispatch.resolve_adaln_backend(0, "cpu") == "torch"
    assert dispatch.resolve_adaln_backend(False, "cpu") == "torch"
    assert dispatch.resolve_adaln_backend("0", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="fused_adaln must be"):
        dispatch.resolve_adaln_backend(2, "cpu")
