"""Respacing strings, timestep_map and the model wrapper."""
import pytest
import torch

from dit_fast.diffusion import create_diffusion, space_timesteps


def test_250_keeps_ends_and_even_gaps():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert gaps <= {4, 5}


def test_ddim_uses_integer_stride():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))


def test_sections():
    steps = sorted(space_timesteps(300, "10,20,30"))
    first, second, third = steps[:10], steps[10:30], steps[30:]
    assert (first[0], first[-1], len(first)) == (0, 99, 10)
    assert (second[0], second[-1], len(second)) == (100, 199, 20)
    assert (third[0], third[-1], len(third)) == (200, 299, 30)
    # uneven split: the first T % n sections get one more step (sizes 4, 3, 3)
    assert sorted(space_timesteps(10, "3,3,3")) == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert space_timesteps(10, [1]) == {0}


def test_empty_respacing_means_all_steps():
    d = create_diffusion("", diffusion_steps=50)
    assert d.num_timesteps == 50 and d.timestep_map == list(range(50))


def test_timestep_map_reaches_model():
    d = create_diffusion("10")
    assert d.timestep_map == sorted(space_timesteps(1000, "10"))
    assert d.num_timesteps == 10 and d.original_num_steps == 1000
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x = torch.zeros(2, 1, 2, 2)
    d.p_mean_variance(model, x, torch.tensor([0, 9]))
    d.training_losses(model, x, torch.tensor([9, 1]))
    assert seen[0].tolist() == [0, 999] and seen[1].tolist() == [999, d.timestep_map[1]]
    cpu = torch.device("cpu")
    assert d.schedule_on(cpu) is d.schedule_on(cpu)  # the map lives in the per-device schedule, built once
    assert d.schedule_on(cpu).model_timesteps.tolist() == d.timestep_map


@pytest.mark.parametrize("spec,match", [
    ("ddim600", "Nearby counts"),
    ("ddimx", "ddimN"),
    ("abc", "comma-separated"),
    ("2000", "cannot divide section 0 of 1000 steps into 2000"),
    ("10,400,10", "section 1 of 333 steps into 400"),
    ("0", "keeps no timesteps"),
    ("10,-1", ">= 0"),
])
def test_bad_respacing_raises(spec, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(spec)
