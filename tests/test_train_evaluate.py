"""train.py --eval-every: ADM's metrics of EMA samples during training (dit_fast/train/evaluate.py).

The real Inception architecture with random weights (nothing can be downloaded here), a tiny DiT on
8x8 digits, 4 samples per evaluation (the fewest precision and recall allow); tests/train_fast_frechet.py stands in for scipy's 2048-wide sqrtm.
Checked: two DeepSpeed ranks log the metrics at the expected steps (log.txt, metrics.jsonl) and train
bit-identically to the same run without evaluation; an evaluation killed midway is done again on resume
and gives the numbers of the uninterrupted run, in metrics.jsonl and in TensorBoard alike.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.evaluation_helpers import save_random_weights
from tests.test_train_launch import ROOT, TINY, _clean_env, launch, ok, run_dir_of

pytestmark = pytest.mark.slow

ENTRY = "tests/train_fast_frechet.py"  # train.py with the stand-in Fréchet distance
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dit_fast.data import write_digits_features
    base = tmp_path_factory.mktemp("train_eval")
    rng = np.random.default_rng(0)
    np.savez(base / "ref.npz", arr_0=rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    return {"feat": write_digits_features(base / "feat8", 8), "ref": base / "ref.npz",
            "weights": save_random_weights(base / "inception.pth", seed=3)}


def _eval_flags(inputs, every=2):
    return ["--eval-every", str(every), "--eval-samples", "4", "--eval-steps", "3", "--eval-ref",
            str(inputs["ref"]), "--inception-weights", str(inputs["weights"])]


def records(run):
    """(loss records, evaluation records) of metrics.jsonl, in order."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r], [r for r in lines if "fid" in r]


def test_two_ranks_log_metrics_and_train_bit_identically(tmp_path, inputs):
    common = ["--features-path", str(inputs["feat"]), "--max-steps", "4", "--num-workers", "0"]
    with ThreadPoolExecutor(2) as pool:  # both launches at once: mostly start-up, and the cores idle
        plain = pool.submit(launch, [*common, "--results-dir", str(tmp_path / "plain")])
        evaluated = pool.submit(launch, [*common, "--results-dir", str(tmp_path / "eval"), *_eval_flags(inputs)],
                                script=ENTRY)
        ok(plain.result())
        out = ok(evaluated.result())
    plain_losses, none = records(run_dir_of(tmp_path / "plain"))
    eval_run = run_dir_of(tmp_path / "eval")
    losses, evaluations = records(eval_run)
    assert none == [] and [s for s, _ in plain_losses] == [1, 2, 3, 4]
    assert losses == plain_losses  # same bits: evaluation draws nothing from training's RNG streams
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:
        assert all(np.isfinite(r[key]) for key in METRICS) and r["eval_samples"] == 4
        assert r["eval_seconds"] > 0 and 0 < r["eval_share"] < 1
    assert evaluations[0]["fid"] != evaluations[1]["fid"]  # other weights, other noise: other samples
    log = (eval_run / "log.txt").read_text()
    assert "(step=0000002) Eval of the EMA on 4 samples (dpm-solver++, 3 steps, cfg 1): Inception Score:" in log
    assert log.count("Eval of the EMA") == 2 and "ref.npz: features cached in" in out.stdout + out.stderr


def _single(args, env=None):
    """Plain `python tests/train_fast_frechet.py` (one process: cheaper than the launcher)."""
    cmd = [sys.executable, ENTRY, *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_clean_env(env), capture_output=True, text=True, timeout=300)


def test_evaluation_killed_midway_is_redone_on_resume(tmp_path, inputs):
    common = ["--features-path", str(inputs["feat"]), "--max-steps", "4", "--ckpt-every", "2",
              "--keep-last", "0", *_eval_flags(inputs, every=4)]
    ok(_single([*common, "--results-dir", str(tmp_path / "whole")]))
    killed = _single([*common, "--results-dir", str(tmp_path / "cut")], env={"DIT_FAST_FAULT": "kill:eval.mid:4"})
    assert killed.returncode != 0
    run = run_dir_of(tmp_path / "cut")
    assert records(run)[1] == []  # step 4's evaluation never logged
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # evaluated before saved
    ok(_single([*common, "--results-dir", str(tmp_path / "cut"), "--resume", "auto"]))
    whole_losses, whole_evals = records(run_dir_of(tmp_path / "whole"))
    losses, evals = records(run)
    assert losses == whole_losses and [r["step"] for r in evals] == [r["step"] for r in whole_evals] == [4]
    assert {k: evals[0][k] for k in METRICS} == {k: whole_evals[0][k] for k in METRICS}
    # TensorBoard tells the same story: every step once (steps 1-2 on disk before the kill -- flushed
    # with checkpoint 2 at the latest --, 3-4 purged and written again on resume), the evaluation at step 4.
    assert tensorboard_scalars(run, "train/loss") == [(s, np.float32(v)) for s, v in losses]
    assert tensorboard_scalars(run, "eval/fid") == [(4, np.float32(evals[0]["fid"]))]


def tensorboard_scalars(run, tag: str) -> list:
    """(step, value) of one scalar in the run's TensorBoard events, as TensorBoard reads them."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, np.float32(e.value)) for e in events.Scalars(tag)]
