"""SiT's checkpoints: DiT's keys with the learned-sigma output layer (2C channels, the second half
discarded by SiT's model). A random DiT saved in that layout (SiT's release file: a bare state dict;
SiT's train.py: {"model", "ema", "opt", "args"}) loads strictly into our DiT(learn_sigma=True), and
drop_learned_sigma turns it into SiT's model function, guided or not."""
import argparse

import pytest
import torch

from dit_fast.checkpoint import CheckpointError, load_into_model, load_state_dict
from dit_fast.models import DiT
from dit_fast.transport import Sampler, create_transport, drop_learned_sigma

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def random_sit_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Random values everywhere (adaLN-Zero would start the output at exactly zero).
    return {name: 0.05 * torch.randn(v.shape, generator=gen) for name, v in
            DiT(**CONFIG, learn_sigma=True).state_dict().items()}


@pytest.mark.parametrize("layout", ["release", "train"])
def test_sit_file_loads_strictly(tmp_path, layout):
    state = random_sit_state()
    file = tmp_path / "SiT-tiny.pt"
    # SiT's train.py checkpoint has the raw weights under "model"; its sample.py reads "ema".
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    train_file = {"model": zeros, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}
    torch.save(state if layout == "release" else train_file, file)
    model = load_into_model(DiT(**CONFIG, learn_sigma=True), load_state_dict(file)).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert model.final_layer.linear.out_features == 2 * 2 * 8   # p * p * 2C


def test_sit_file_does_not_fit_a_model_without_learned_sigma(tmp_path):
    torch.save(random_sit_state(), tmp_path / "sit.pt")
    with pytest.raises(CheckpointError, match="final_layer"):
        load_into_model(DiT(**CONFIG, learn_sigma=False), load_state_dict(tmp_path / "sit.pt"))


def sit_forward_with_cfg(model, x, t, y, cfg_scale):
    """SiT's model function written out: SiT's forward already drops the sigma half, then guidance
    on the first three of the C channels, the last channel taken from the conditional half as is."""
    n = x.shape[0] // 2
    out = model(x[:n].repeat(2, 1, 1, 1), t, y)[:, :4]
    cond, uncond = out[:, :3].chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out[:, 3:]], dim=1)


def test_drop_learned_sigma_gives_sit_model_functions():
    model = DiT(**CONFIG, learn_sigma=True).eval()
    model.load_state_dict(random_sit_state(1))
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 10, 10])
    with torch.inference_mode():
        plain = drop_learned_sigma(model)(x, t, y=y)
        assert plain.shape == x.shape and torch.equal(plain, model(x, t, y)[:, :4])
        guided = drop_learned_sigma(model.forward_with_cfg)(x, t, y=y, cfg_scale=4.0)
        torch.testing.assert_close(guided, sit_forward_with_cfg(model, x, t, y, 4.0))
    unchanged = lambda x, t: x + 1  # noqa: E731   (a model without learned sigma passes through)
    assert torch.equal(drop_learned_sigma(unchanged)(x, t), x + 1)


def test_sit_checkpoint_samples_and_trains_through_the_wrapper():
    model = DiT(**CONFIG, learn_sigma=True).eval()
    model.load_state_dict(random_sit_state(2))
    transport = create_transport()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])
    fn = drop_learned_sigma(model.forward_with_cfg)
    samples = Sampler(transport).sample_ode(sampling_method="euler", num_steps=4)(z, fn, y=y, cfg_scale=1.5)[-1]
    assert samples.shape == z.shape and torch.isfinite(samples).all()
    loss = transport.training_losses(drop_learned_sigma(model), torch.randn(2, 4, 8, 8), dict(y=y))["loss"]
    assert loss.shape == (2,) and torch.isfinite(loss).all()
