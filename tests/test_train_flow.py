"""train.py --objective flow (SiT's flow matching) under the real launcher: 2 CPU ranks, ZeRO-2, bf16.

A run killed mid-step and resumed with --resume auto reproduces the uninterrupted run's per-step
losses and every checkpoint tensor (weights, fp32 optimizer partitions, EMA, RNG) bit for bit; the
saved config records the objective and the transport, so the resume (and sampling) pick them up.
Cost: three launches of 4 steps of a 2-block DiT on the digits, ~25 s each on 2 cores.
"""
import json

import pytest
import torch

from tests.test_train_faults import COMMON, FAULT, assert_same_checkpoint, ckpt_names
from tests.test_train_launch import check_ema_export, launch, losses, ok, run_dir_of

pytestmark = pytest.mark.slow

FLOW = ["--objective", "flow", "--path-type", "Linear", "--prediction", "velocity"]
SHORT = [*COMMON[:COMMON.index("--max-steps")], "--max-steps", "4", "--ckpt-every", "2",
         *COMMON[COMMON.index("--deepspeed_config"):]]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from dit_fast.data import write_digits_features
    return write_digits_features(tmp_path_factory.mktemp("digits") / "feat8", 8)


def test_flow_run_killed_and_resumed_is_bit_exact(tmp_path, digits8):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    args = [*SHORT, *FLOW, "--features-path", str(digits8), "--keep-last", "0"]
    ok(launch([*args, "--results-dir", str(ref_dir)]))
    reference = run_dir_of(ref_dir)
    ref = losses(reference)
    assert [s for s, _ in ref] == [1, 2, 3, 4]
    saved = json.loads((reference / "config.json").read_text())
    assert saved["train"]["objective"] == "flow" and saved["transport"]["path_type"] == "Linear"
    state = torch.load(reference / "checkpoints/step-0000004/train_state.pt", weights_only=True)
    assert state["config"]["train"]["objective"] == "flow"

    proc = launch([*args, "--results-dir", str(run_dir)], env={FAULT: "kill:step.mid:3"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    run = run_dir_of(run_dir)
    assert ckpt_names(run) == ["step-0000002"]
    out = ok(launch([*args, "--results-dir", str(run_dir), "--resume", "auto"]))
    assert "continuing " + str(run / "checkpoints" / "step-0000002") in out.stdout + out.stderr
    assert losses(run) == ref
    assert_same_checkpoint(reference / "checkpoints/step-0000004", run / "checkpoints/step-0000004")
    check_ema_export(run / "checkpoints/step-0000004", 4)


@pytest.mark.parametrize("saved_extra", [{}, {"train": {"objective": "flow"}}])
def test_auto_resume_treats_the_objective_as_part_of_the_experiment(saved_extra):
    """A flow run never continues a diffusion run (and back); a config saved before the objective
    existed reads as diffusion, so old runs still continue."""
    from dit_fast.config import Config, config_to_dict
    from dit_fast.train.resume import config_differences
    old = config_to_dict(Config())
    del old["transport"], old["train"]["objective"]  # a config.json from before this section
    old["train"].update(saved_extra.get("train", {}))
    now = config_to_dict(Config())
    expect = [] if not saved_extra else ["train.objective: checkpoint 'flow' vs now 'diffusion'"]
    assert config_differences(old, now) == expect
    now["transport"]["path_type"] = "GVP"
    assert "transport.path_type: checkpoint None vs now 'GVP'" in config_differences(old, now)


class _Engine:
    """What TrainStep needs of DeepSpeed's engine: call, backward, step."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


@pytest.mark.parametrize("flags", [[], ["--path-type", "GVP", "--prediction", "noise", "--loss-weight", "likelihood"],
                                   ["--path-type", "VP", "--prediction", "score", "--train-eps", "0.01"]])
def test_the_flow_micro_step_is_sits_loss(flags):
    """train.py's flags -> config -> TrainStep's micro-step: the same number as SiT's recipe
    (create_transport(...).training_losses(model, x1, dict(y=y))["loss"].mean() on the model's first C
    channels) from the same seed; the diffusion default is DiT's (t = randint, then training_losses)."""
    from dit_fast.config import config_from_args
    from dit_fast.diffusion import create_diffusion
    from dit_fast.models import build_model
    from dit_fast.train import cli as train_cli
    from dit_fast.train.step import TrainStep
    from dit_fast.transport import create_transport, drop_learned_sigma

    tiny = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--image-size", "8",
            "--num-classes", "10", "--vae", "none", "--features-path", "x"]
    for objective in ("flow", "diffusion"):
        extra = ["--objective", "flow", *flags] if objective == "flow" else []
        cfg = config_from_args(train_cli.build_parser().parse_args([*tiny, *extra]))
        cfg.model.in_channels, cfg.model.input_size = 4, 8
        assert cfg.train.objective == objective and cfg.transport.path_type == (flags[1] if extra[2:] else "Linear")
        torch.manual_seed(0)
        model = build_model(cfg.model)
        x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
        step = TrainStep.from_config(cfg, _Engine(model), None, torch.device("cpu"))
        step.dtype = torch.float32
        torch.manual_seed(5)
        got = step.micro_step(x, y)
        torch.manual_seed(5)
        with torch.no_grad():
            if objective == "flow":
                tc = cfg.transport
                transport = create_transport(tc.path_type, tc.prediction, tc.loss_weight, tc.train_eps, tc.sample_eps)
                want = transport.training_losses(drop_learned_sigma(model), x, dict(y=y))["loss"].mean()
            else:
                diffusion = create_diffusion("")
                t = torch.randint(0, diffusion.num_timesteps, (3,))
                want = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        assert torch.equal(got, want), (objective, flags)
