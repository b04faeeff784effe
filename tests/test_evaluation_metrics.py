"""ADM's metrics on random features, each against an independent brute-force computation in fp64."""
import warnings

import numpy as np
import pytest
import torch

from dit_fast.evaluation import frechet_distance, inception_score, precision_recall, statistics
from dit_fast.evaluation.manifold import pairwise_sq_distances


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T + (0 if rank else np.eye(d))


def _pool_like(rng, n, d=64):
    """Non-negative, skewed features like averaged ReLU activations (pool_3 is a mean of ReLUs)."""
    return (rng.gamma(0.6, 0.5, (n, d)) * rng.uniform(0.5, 2.0, d)).astype(np.float32)


# --- Fréchet distance -------------------------------------------------------------------------------

def test_frechet_against_eigenvalues_of_the_product():
    # Tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)): S1 S2 is similar to S1^1/2 S2 S1^1/2, whose eigenvalues
    # are real and >= 0 -- a route that shares nothing with scipy's Schur-based sqrtm.
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 30), _spd(rng, 30)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    eig = np.linalg.eigvals(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_diagonal_covariances_closed_form():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu1, mu2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 3.0])
    want = 1 + 4 + 9 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


@pytest.mark.parametrize("width", [64, 2023])  # sFID's spatial width: scipy's sqrtm at full size (~8 s)
def test_identical_feature_sets_are_zero_apart(width):
    feats = _pool_like(np.random.default_rng(width), 3 * width, width)
    mu, sigma = statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8 * np.trace(sigma))


def test_frechet_of_statistics_ignores_sample_order():
    rng = np.random.default_rng(4)
    a, b = _pool_like(rng, 300, 32), _pool_like(rng, 200, 32) * 1.1
    base = frechet_distance(*statistics(a), *statistics(b))
    shuffled = frechet_distance(*statistics(a[rng.permutation(300)]), *statistics(b[rng.permutation(200)]))
    assert base > 0.1 and shuffled == pytest.approx(base, rel=1e-10)


def test_singular_covariances_take_adms_offset_and_stay_finite():
    rng = np.random.default_rng(3)
    s1, s2 = _spd(rng, 10, rank=3), _spd(rng, 10, rank=4)  # fewer samples than features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = frechet_distance(np.zeros(10), s1, np.zeros(10), s2)
    assert np.isfinite(d) and d > 0


def test_statistics_and_mismatched_shapes():
    x = np.random.default_rng(5).standard_normal((50, 4))
    mu, sigma = statistics(x)
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 49, rtol=1e-12)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        statistics(x[:1])


# --- Inception Score ---------------------------------------------------------------------------------

def _brute_inception_score(p, split):
    scores = []
    for start in range(0, len(p), split):
        rows = [list(map(float, r)) for r in p[start:start + split]]
        marginal = [sum(col) / len(rows) for col in zip(*rows)]
        kls = [sum(q * np.log(q / m) for q, m in zip(r, marginal) if q > 0) for r in rows]
        scores.append(np.exp(sum(kls) / len(kls)))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("n,split", [(12, 5000), (23, 5), (10, 5)])  # one split; uneven; even
def test_inception_score_against_brute_force(n, split):
    logits = np.random.default_rng(n).standard_normal((n, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = _brute_inception_score(p, split)
    assert inception_score(p, split) == pytest.approx(want, rel=1e-12)
    assert inception_score(p.astype(np.float32), split) == pytest.approx(want, rel=1e-5)


def test_inception_score_reports_the_mean_over_splits():
    p = np.random.default_rng(0).dirichlet(np.ones(6) * 0.3, 9)
    parts = [inception_score(p[:4]), inception_score(p[4:8]), inception_score(p[8:])]
    assert inception_score(p, split_size=4) == pytest.approx(np.mean(parts), rel=1e-12)


@pytest.mark.parametrize("classes", [1, 10, 1008])
def test_inception_score_of_one_hot_predictions_is_the_class_count(classes):
    p = np.eye(classes, dtype=np.float32)[np.arange(3 * classes) % classes]
    assert inception_score(p) == pytest.approx(classes, rel=1e-5)


def test_inception_score_ignores_order_within_a_split():
    p = np.random.default_rng(1).dirichlet(np.ones(5), 40)
    assert inception_score(p[np.random.default_rng(2).permutation(40)]) == pytest.approx(inception_score(p),
                                                                                          rel=1e-12)


# --- precision and recall ----------------------------------------------------------------------------

def _brute_precision_recall(ref, sample, k):
    ref, sample = ref.astype(np.float64), sample.astype(np.float64)
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731 (no expansion)
    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]           # column 0 is the point itself
    r_sample = np.sort(sq(sample, sample), axis=1)[:, k]
    cross = sq(sample, ref)                                # (N2, N1)
    precision = np.mean([any(cross[i, j] <= r_ref[j] for j in range(len(ref))) for i in range(len(sample))])
    recall = np.mean([any(cross[i, j] <= r_sample[i] for i in range(len(sample))) for j in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_against_full_knn(k):
    rng = np.random.default_rng(k)
    ref, sample = _pool_like(rng, 70), _pool_like(rng, 55) * 1.3 + 0.05  # overlapping, not equal
    got = precision_recall(ref, sample, k=k, device="cpu")
    want = _brute_precision_recall(ref, sample, k)
    assert got == want and 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_row_blocks_change_nothing(monkeypatch):
    rng = np.random.default_rng(8)
    ref, sample = _pool_like(rng, 45), _pool_like(rng, 38) * 1.2
    whole = precision_recall(ref, sample, device="cpu")
    monkeypatch.setattr("dit_fast.evaluation.manifold.ROW_BLOCK", 7)
    assert precision_recall(ref, sample, device="cpu") == whole


def test_precision_recall_ignore_order_and_identical_sets_score_one():
    rng = np.random.default_rng(9)
    ref, sample = _pool_like(rng, 60), _pool_like(rng, 50) * 1.2
    base = precision_recall(ref, sample, device="cpu")
    assert precision_recall(ref[rng.permutation(60)], sample[rng.permutation(50)], device="cpu") == base
    assert precision_recall(ref, ref, device="cpu") == (1.0, 1.0)


def test_precision_recall_needs_more_points_than_k():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(x, x, k=3)


@pytest.mark.parametrize("arithmetic", ["fp32", "adm-fp16"])
def test_lower_precision_distances_stay_close_to_fp64(arithmetic):
    rng = np.random.default_rng(11)
    u, v = torch.from_numpy(_pool_like(rng, 40, 256)), torch.from_numpy(_pool_like(rng, 30, 256))
    exact = pairwise_sq_distances(u, v, "fp64")
    rough = pairwise_sq_distances(u, v, arithmetic).double()
    # fp16 keeps 11 significant bits of each squared norm (~ the distance's size here): < 1% off
    bound = 2e-2 if arithmetic == "adm-fp16" else 1e-5
    assert ((rough - exact).abs() / exact).max() < bound


def test_adm_fp16_falls_back_to_fp32_when_fp16_overflows():
    u = torch.full((3, 64), 100.0)  # ||u||^2 = 640,000 > fp16's 65,504
    v = torch.rand(4, 64) * 100
    torch.testing.assert_close(pairwise_sq_distances(u, v, "adm-fp16"), pairwise_sq_distances(u, v, "fp32"))


# --- features gathered across ranks --------------------------------------------------------------------

def _local_features(rank):
    rng = np.random.default_rng(rank)
    n = 3 + rank  # unequal shares
    return [rng.random((n, w), dtype=np.float32) for w in (2048, 2023, 1008)]


def _gather_worker(rank, port, results):
    import os
    from datetime import timedelta
    import torch.distributed as dist
    from dit_fast.evaluation import Features, gather_features
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    gathered = gather_features(Features(*_local_features(rank)))
    results.put((rank, gathered.arrays()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_features_concatenates_every_rank_in_rank_order():
    import torch.multiprocessing as mp
    from dit_fast.distributed import free_port
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        for name, a, b in zip(("pool", "spatial", "logits"), _local_features(0), _local_features(1)):
            np.testing.assert_array_equal(got[rank][name], np.concatenate([a, b]), err_msg=name)
