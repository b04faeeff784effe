"""dit_fast.dispatch: flag validation normalises bool-like values (0 means off, everywhere)."""
import pytest
import torch

from dit_fast import dispatch


@pytest.mark.parametrize("value, want", [
    ("torch", "torch"), ("triton", "triton"), ("Triton", "triton"), ("auto", "auto"), ("AUTO", "auto"),
    # the fused_adaln alias, mapped in this one place
    (True, "triton"), (False, "torch"), (1, "triton"), (0, "torch"),
    ("true", "triton"), ("False", "torch"), ("1", "triton"), ("0", "torch"), (" TRUE ", "triton"),
])
def test_adaln_backend_and_its_fused_adaln_alias_are_normalised(value, want):
    assert dispatch.adaln_backend_name(value) == want


@pytest.mark.parametrize("value", [2, -1, 0.0, 1.0, None, "maybe", "yes", "", [True]])
def test_adaln_flag_rejects_the_rest(value):
    with pytest.raises(ValueError, match="adaln_backend must be .*fused_adaln must be"):
        dispatch.adaln_backend_name(value)


def test_zero_turns_the_triton_path_off(monkeypatch):
    """0 used to reach the Triton branch (0 is not False) and then shared False's cache entry."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    assert dispatch.resolve_adaln_backend(0, "cpu") == "torch"
    assert dispatch.resolve_adaln_backend(False, "cpu") == "torch"
    assert dispatch.resolve_adaln_backend("0", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="fused_adaln must be"):
        dispatch.resolve_adaln_backend(2, "cpu")


def test_auto_attention_is_sdpa_everywhere_citing_the_measurement(monkeypatch, caplog):
    """cuDNN SDPA beat our Triton attention on the H200 (fwd 242 vs 211 TFLOP/s): auto -> sdpa even
    where Triton could run, logged once with the results file."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_triton_status", lambda device: (True, "ok"))
    with caplog.at_level("INFO", logger="dit_fast"):
        assert dispatch._resolve_attn("auto", "cuda", "0") == "sdpa"
        assert dispatch._resolve_attn("auto", "cuda", "0") == "sdpa"
    assert dispatch.resolve_attn_backend("auto", "cpu") == "sdpa"
    logged = [r.getMessage() for r in caplog.records if "attention backend auto" in r.getMessage()]
    assert len(logged) == 1 and dispatch.MEASURED in logged[0]


def test_auto_adaln_is_torch_under_compile_and_triton_in_eager_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_triton_status", lambda device: (True, "ok"))
    assert dispatch._resolve_adaln("auto", "cuda", "0", compiling=False) == "triton"
    assert dispatch._resolve_adaln("auto", "cuda", "0", compiling=True) == "torch"
    assert dispatch._resolve_adaln("auto", "cpu", "0", compiling=False) == "torch"
    assert dispatch._resolve_adaln(True, "cuda", "0", compiling=True) == "triton"  # asked for: kept

    def norm(x):
        return x * 2 if dispatch.resolve_adaln_backend("auto", "cuda") == "triton" else x * 3
    x = torch.ones(2)
    assert torch.equal(norm(x), x * 2)                                    # eager: the fused ops
    torch._dynamo.reset()
    assert torch.equal(torch.compile(norm, backend="eager", fullgraph=True)(x), x * 3)  # traced: inductor's
    torch._dynamo.reset()
