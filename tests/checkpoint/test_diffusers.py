"""Our DiT <-> diffusers' DiTTransformer2DModel (dit_fast.checkpoint.diffusers): the mapping is exact with
the original timestep frequencies, round-trips, and refuses what diffusers cannot hold. CPU, tiny, fp32."""
import pytest
import torch

from dit_fast.checkpoint import diffusers as fmt
from dit_fast.checkpoint.diffusers import DiffusersFormatError
from tests.checkpoint.tiny_weights import dit_inputs, perturbed_dit, rel_error

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _diffusers_copy(model):
    config = {k: v for k, v in fmt.transformer_config(model).items() if not k.startswith("_")}
    theirs = diffusers.DiTTransformer2DModel(**config).eval()
    theirs.load_state_dict(fmt.to_diffusers_state_dict(model.state_dict()), strict=True)
    return theirs


@pytest.mark.parametrize("overrides", [{}, {"learn_sigma": False}, {"num_classes": 1000, "in_channels": 4}],
                         ids=["10-classes", "fixed-sigma", "1000-classes"])
def test_mapping_is_exact_with_the_original_timestep_frequencies(overrides):
    model = perturbed_dit(**overrides)
    theirs = _diffusers_copy(model)
    x, t, y = dit_inputs(model)
    with torch.no_grad():
        ours = model(x, t, y)
        stock = theirs(x, timestep=t, class_labels=y).sample
        fmt.use_original_timestep_frequencies(theirs)
        exact = theirs(x, timestep=t, class_labels=y).sample
    assert rel_error(exact, ours) <= 1e-5
    # diffusers' own DiT embeds timesteps with 10000^(-i/127), not DiT's 10000^(-i/128). If this
    # starts failing, diffusers fixed it: update diffusers_format's docstring and the README.
    assert rel_error(stock, ours) > 1e-3
    assert torch.equal(theirs.pos_embed.pos_embed, model.pos_embed)  # the recomputed table is ours


def test_round_trip_and_per_block_embedders():
    model = perturbed_dit()
    theirs = fmt.to_diffusers_state_dict(model.state_dict())
    emb = "norm1.emb.timestep_embedder.linear_1.weight"
    assert torch.equal(theirs[f"transformer_blocks.0.{emb}"], theirs[f"transformer_blocks.1.{emb}"])
    back = fmt.from_diffusers_state_dict(theirs)
    assert set(back) == set(model.state_dict()) - {"pos_embed"}
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items() if k != "pos_embed")
    theirs[f"transformer_blocks.1.{emb}"] = theirs[f"transformer_blocks.1.{emb}"] + 1e-3
    with pytest.raises(DiffusersFormatError, match=r"transformer_blocks\.1\..*differs from block 0"):
        fmt.from_diffusers_state_dict(theirs)


def test_what_diffusers_cannot_hold_is_refused():
    with pytest.raises(DiffusersFormatError, match="square only"):
        fmt.transformer_config(perturbed_dit(input_size=(8, 4)))
    with pytest.raises(DiffusersFormatError, match="null-class row"):
        fmt.transformer_config(perturbed_dit(class_dropout_prob=0.0))
