"""The built-in demo: the independent scorer, the CFG wrapper and a very short end-to-end run."""
import json

import numpy as np
import pytest
import torch

from dit_fast.data.digits import digits_dataset
from dit_fast.scoring import DigitScorer, to_uint8_nhwc


@pytest.fixture(scope="module")
def scorer():
    return DigitScorer(image_size=8, seed=0)


def test_scorer_real_digits_score_high_and_noise_low(scorer):
    assert scorer.heldout_accuracy > 0.9
    images, labels = digits_dataset(8)
    real = to_uint8_nhwc(images[scorer.test_idx])  # (N, 8, 8, 1)
    good = scorer.score(real, labels[scorer.test_idx])
    assert good["accuracy"] == pytest.approx(scorer.heldout_accuracy)
    assert good["frechet_distance"] < 2.0
    wrong = scorer.score(real, (labels[scorer.test_idx] + 1) % 10)
    assert wrong["accuracy"] < 0.1
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    bad = scorer.score(noise, labels[scorer.test_idx])
    assert bad["frechet_distance"] > 20 * good["frechet_distance"]


def test_real_vs_real_uses_digits_the_reference_never_saw(scorer):
    """The real-subset distance compares held-out digits with the training split's statistics."""
    assert not set(scorer.test_idx) & set(scorer.train_idx)
    subset = scorer._heldout_subset(100)
    assert len(subset) == 100 and set(subset) <= set(scorer.test_idx)
    assert np.bincount(scorer.labels[subset], minlength=10).min() >= 9  # stratified: ~10 per class
    real = to_uint8_nhwc(digits_dataset(8)[0][scorer.train_idx[:100]])
    seen = scorer.score(real, scorer.labels[scorer.train_idx[:100]])
    assert seen["frechet_distance_real_subset"] > 0.0


def test_scorer_rejects_wrong_inputs(scorer):
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(np.zeros((3, 8, 8, 1), np.float32), np.zeros(3, int))
    with pytest.raises(ValueError, match="shape"):
        scorer.score(np.zeros((3, 16, 16, 1), np.uint8), np.zeros(3, int))
    with pytest.raises(ValueError, match="labels"):
        scorer.score(np.zeros((3, 8, 8, 1), np.uint8), np.zeros(2, int))


def test_demo_end_to_end_tiny(tmp_path):
    """train.py (DeepSpeed, 3 steps) -> EMA weights -> CFG samples -> grid, npz, metrics."""
    from dit_fast.demo import main

    metrics = main(["--out", str(tmp_path), "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
                    "--max-steps", "3", "--global-batch-size", "16", "--log-every", "1",
                    "--num-sampling-steps", "3", "--samples-per-class", "2", "--threads", "1"])
    for name in ("digits_grid.png", "samples.npz", "metrics.json", "train_log.txt"):
        assert (tmp_path / name).is_file(), name
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (20, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and 0.0 <= saved["accuracy"] <= 1.0
    assert np.isfinite(saved["frechet_distance"])
    assert saved["recipe"]["max_steps"] == 3
    assert "(step=0000003)" in (tmp_path / "train_log.txt").read_text()


def test_flow_demo_end_to_end_tiny(tmp_path):
    """--objective flow: train.py trains SiT's loss (its config says so) and SiT's ODE samples."""
    from dit_fast.demo import main

    metrics = main(["--out", str(tmp_path), "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
                    "--max-steps", "2", "--global-batch-size", "16", "--log-every", "1", "--objective", "flow",
                    "--num-sampling-steps", "3", "--samples-per-class", "1", "--threads", "1"])
    assert metrics["recipe"]["objective"] == "flow" and np.isfinite(metrics["frechet_distance"])
    assert "train.objective = 'flow'" in (tmp_path / "train_log.txt").read_text()
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (10, 8, 8, 1)


@pytest.mark.parametrize("flags, match", [(["--image-size", "9"], "divisible by the patch size 2 of --model DiT-S/2"),
                                          (["--model", "DiT-S/4", "--image-size", "10"], "patch size 4"),
                                          (["--hidden-size", "30"], "--num-heads"),
                                          (["--max-steps", "0"], "--max-steps"),
                                          (["--ema-decay", "1"], "--ema-decay"),
                                          (["--num-classes", "7"], "the digits have 10 classes")])
def test_demo_rejects_bad_flags_before_any_work(tmp_path, flags, match):
    from dit_fast.demo import main

    with pytest.raises(ValueError, match=match):
        main(["--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
