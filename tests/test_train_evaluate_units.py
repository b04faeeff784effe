"""TrainingEvaluator in one process, without DeepSpeed: a flow model's ODE samples of grey digits-sized
images through the real Inception architecture (random weights), the global RNG states untouched,
the same step giving the same numbers, and the record metrics.jsonl / the log receive; a latent run's
samples decoded with the run's latent normalisation; the flow / rank flag checks."""
import json
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_fast.config import Config, EvalConfig, ModelConfig
from dit_fast.evaluation import FeatureExtractor
from dit_fast.models import build_model
from dit_fast.train.evaluate import TrainingEvaluator, check_evaluation, sample_config
from dit_fast.train.metrics import MetricsWriter
from tests.evaluation_helpers import mean_distance, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_units")
    np.savez(base / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return {"base": base, "ref": str(base / "ref.npz"),
            "weights": str(save_random_weights(base / "inception.pth", seed=4))}


def _flow_config(files, **evaluation) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, image_size=8, num_classes=10,
                            in_channels=1, input_size=8)
    cfg.data.vae, cfg.train.objective = "none", "flow"
    cfg.evaluation = EvalConfig(**{"eval_every": 2, "eval_samples": 4, "eval_ref": files["ref"],
                                   "inception_weights": files["weights"], "eval_steps": 2, **evaluation})
    return cfg


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_flow_evaluation_keeps_every_rng_and_repeats_itself(files, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("dit_fast.evaluation.suite.frechet_distance", mean_distance)
    cfg = _flow_config(files, eval_sampler="euler")
    check_evaluation(cfg, world_size=1)
    sampling = sample_config(cfg)
    assert (sampling.objective, sampling.mode, sampling.sampling_method) == ("flow", "ODE", "euler")
    torch.manual_seed(0)
    ema = SimpleNamespace(model=build_model(cfg.model).eval())
    writer = MetricsWriter(tmp_path, rank=0)
    logger = logging.getLogger("test_train_evaluate_units")
    evaluator = TrainingEvaluator(cfg, torch.device("cpu"), 0, 1, logger, writer)
    extract = FeatureExtractor.__call__

    def drawing(self, images):  # a part that draws from the global streams (as the model build on ranks
        torch.rand(1), np.random.rand(), random.random()  # > 0 does): the evaluator must undo it
        return extract(self, images)
    monkeypatch.setattr(FeatureExtractor, "__call__", drawing)

    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = _rng_states()
    with caplog.at_level(logging.INFO, logger=logger.name):
        for step in (2, 2, 4):
            assert evaluator.run(step, ema) > 0
    after = _rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    writer.close()
    first, again, later = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = ("inception_score", "fid", "sfid", "precision", "recall")
    assert [first[k] for k in keys] == [again[k] for k in keys]  # seeded by (seed, step, rank, batch)
    assert first["fid"] != later["fid"]  # another step, other noise
    assert first["step"] == 2 and first["eval_samples"] == 4 and 0 < first["eval_share"] <= 1
    assert "(step=0000004) Eval of the EMA on 4 samples (euler, 2 steps, cfg 1): Inception Score:" in caplog.text


@pytest.mark.parametrize("evaluation, world, message", [
    ({"eval_sampler": "dpm-solver++"}, 1, "a flow model is evaluated with one of"),
    ({"eval_samples": 4}, 8, "one sample per rank"),
    ({"eval_every": 0, "eval_sampler": "heun"}, 1, "options of --eval-every"),
])
def test_flow_and_rank_checks(files, evaluation, world, message):
    with pytest.raises(ValueError, match=message):
        check_evaluation(_flow_config(files, **evaluation), world_size=world)


def test_latent_run_decodes_with_the_runs_normalisation(files, tmp_path, monkeypatch):
    """A --features-path run: the evaluator loads the run's VAE and undoes the run's latent normalisation
    (data.latent_norm), not the VAE config's, before the Inception sees 16x16 RGB samples (DDIM here)."""
    pytest.importorskip("diffusers")
    from tests.vae_helpers import save_tiny_vae
    monkeypatch.setattr("dit_fast.evaluation.suite.frechet_distance", mean_distance)
    cfg = _flow_config(files, eval_sampler="ddim")
    cfg.train.objective = "diffusion"
    cfg.data.vae = str(save_tiny_vae(tmp_path / "vae", scaling_factor=0.3))
    cfg.data.latent_norm = {"mode": "config", "scale": 0.5, "shift": 0.1}
    cfg.model.in_channels, cfg.model.input_size, cfg.model.image_size = 4, 8, 16
    check_evaluation(cfg, world_size=1)
    evaluator = TrainingEvaluator(cfg, torch.device("cpu"), 0, 1, logging.getLogger("latent"),
                                  MetricsWriter(tmp_path, rank=0))
    assert evaluator.vae.norm.to_dict() == cfg.data.latent_norm
    seen = []
    extract = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, x: (seen.append(x.shape), extract(self, x))[1])
    torch.manual_seed(0)
    evaluator.run(2, SimpleNamespace(model=build_model(cfg.model).eval()))
    assert seen[0] == (4, 16, 16, 3)  # the samples (then the 8x8 reference, unless cached)
    assert "fid" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
