"""evaluate.py end to end on the CPU: the real Inception architecture with random weights (nothing can
be downloaded here), ADM batch files, the JSON beside the samples, the feature cache, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from dit_fast.evaluation import cli as evaluate
from dit_fast.evaluation import FeatureExtractor, inception_score, precision_recall, statistics
from tests.evaluation_helpers import save_random_weights

# 7 reference and 5 sample images: the fewest that precision and recall with k=3 allow, plus a few
N_REF, N_SAMPLE = 7, 5


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (N_REF, 24, 24, 3), dtype=np.uint8)
    np.savez(base / "ref.npz", arr_0=ref)
    for name in ("samples_a", "samples_b"):
        np.savez(base / f"{name}.npz", arr_0=(ref[:N_SAMPLE] // 2 + rng.integers(0, 128, (N_SAMPLE, 24, 24, 3),
                                                                                   dtype=np.uint8)))
    return {"base": base, "weights": save_random_weights(base / "random-inception.pth", seed=5)}


def _count_images(monkeypatch):
    seen = []
    original = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, x: (seen.append(len(x)), original(self, x))[1])
    return seen


@pytest.fixture
def frechet_calls(monkeypatch):
    """Records what the suite hands to frechet_distance, answering ||mu1 - mu2||^2. scipy's sqrtm of a
    2048 x 2048 product takes ~20 s on one core, twice per evaluation; the real function is tested at
    full width in test_evaluation_metrics.py. Here: that FID gets pool_3 and sFID spatial statistics,
    and which reference statistics they are."""
    calls = []

    def spy(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(((np.asarray(mu1) - np.asarray(mu2)) ** 2).sum())
    monkeypatch.setattr("dit_fast.evaluation.suite.frechet_distance", spy)
    return calls


def _assert_stats_of(call, sample, ref_stats):
    mu, sigma = statistics(sample)
    np.testing.assert_allclose(call[0], mu, rtol=1e-12)
    np.testing.assert_allclose(call[1], sigma, rtol=1e-12)
    np.testing.assert_allclose(call[2], ref_stats[0], rtol=1e-12)
    np.testing.assert_allclose(call[3], ref_stats[1], rtol=1e-12)


def test_end_to_end_with_cache(batches, monkeypatch, capsys, frechet_calls, one_torch_thread):
    base, weights = batches["base"], str(batches["weights"])
    seen = _count_images(monkeypatch)
    first = evaluate.main([str(base / "ref.npz"), str(base / "samples_a.npz"), "--inception-weights", weights,
                           "--batch-size", "4"])
    assert sum(seen) == N_REF + N_SAMPLE and max(seen) <= 4  # read in batches
    written = json.loads((base / "samples_a.evaluation.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(written[key]) and written[key] == first[key], key
    assert written["fid"] > 0 and 1 <= written["inception_score"] <= 1008
    assert written["reference_features_cached"] is False and written["reference_statistics"] == "images"
    assert "FID:" in capsys.readouterr().out

    seen.clear()  # a second sample batch against the same reference: the reference is not recomputed
    frechet_calls.clear()
    second = evaluate.main([str(base / "ref.npz"), str(base / "samples_b.npz"), "--inception-weights", weights])
    assert sum(seen) == N_SAMPLE and second["reference_features_cached"] is True
    assert "features read from the cache" in capsys.readouterr().out

    # the CLI's numbers are the library's on the same features; FID on pool_3, sFID on spatial
    extractor = FeatureExtractor(weights, device="cpu")
    ref = extractor(np.load(base / "ref.npz")["arr_0"])
    sample = extractor(np.load(base / "samples_b.npz")["arr_0"])
    assert second["inception_score"] == pytest.approx(inception_score(sample.probs()), rel=1e-6)
    assert (second["precision"], second["recall"]) == precision_recall(ref.pool, sample.pool, device="cpu")
    fid_call, sfid_call = frechet_calls
    _assert_stats_of(fid_call, sample.pool, statistics(ref.pool))
    _assert_stats_of(sfid_call, sample.spatial, statistics(ref.spatial))


def test_reference_statistics_in_the_file_are_used(batches, tmp_path, frechet_calls, one_torch_thread):
    base, weights = batches["base"], str(batches["weights"])
    rng = np.random.default_rng(1)
    file_stats = {"mu": rng.random(2048), "sigma": np.eye(2048), "mu_s": rng.random(2023), "sigma_s": np.eye(2023)}
    ref = tmp_path / "adm_ref.npz"  # ADM's layout: images + mu, sigma, mu_s, sigma_s
    np.savez(ref, arr_0=np.load(base / "ref.npz")["arr_0"], **file_stats)
    out = evaluate.main([str(ref), str(base / "samples_a.npz"), "--inception-weights", weights,
                         "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json")])
    assert out["reference_statistics"] == "file" and (tmp_path / "m.json").is_file()
    sample = FeatureExtractor(weights, device="cpu")(np.load(base / "samples_a.npz")["arr_0"])
    _assert_stats_of(frechet_calls[0], sample.pool, (file_stats["mu"], file_stats["sigma"]))
    _assert_stats_of(frechet_calls[1], sample.spatial, (file_stats["mu_s"], file_stats["sigma_s"]))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # both files' features, in --cache-dir


def test_statistics_only_reference_gives_fid_without_precision(batches, tmp_path, frechet_calls, capsys,
                                                                one_torch_thread):
    base, weights = batches["base"], str(batches["weights"])
    ref = tmp_path / "stats.npz"  # e.g. the old --fid-ref files: mu and sigma, no images
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    out = evaluate.main([str(ref), str(base / "samples_a.npz"), "--inception-weights", weights, "--no-cache",
                         "--json", str(tmp_path / "m.json")])
    assert "fid" in out and "sfid" not in out and "precision" not in out and len(frechet_calls) == 1
    assert "statistics only" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "stats.npz"]  # --no-cache: no cache file


def _listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    good = np.zeros((6, 8, 8, 3), np.uint8)
    np.savez(base / "good.npz", arr_0=good)
    np.savez(base / "float.npz", arr_0=good.astype(np.float32))
    np.savez(base / "nchw.npz", arr_0=good.transpose(0, 3, 1, 2))
    np.savez(base / "grey.npz", arr_0=good[..., 0])
    np.savez(base / "few.npz", arr_0=good[:3])
    np.savez(base / "wide.npz", arr_0=np.full((6, 8, 8, 3), 300, np.int32))
    np.savez(base / "other.npz", pictures=good)
    (base / "text.npz").write_text("not an archive")
    save_random_weights(base / "w.pth", seed=1)
    return base


BAD = [
    ("sample floats", ["{b}/good.npz", "{b}/float.npz"], "must hold integers 0..255"),
    ("channels first", ["{b}/good.npz", "{b}/nchw.npz"], "channels first"),
    ("grey", ["{b}/good.npz", "{b}/grey.npz"], "(N, H, W, 3)"),
    ("too few samples", ["{b}/good.npz", "{b}/few.npz"], "need at least 4"),
    ("too few references", ["{b}/few.npz", "{b}/good.npz"], "reference batch"),
    ("values above 255", ["{b}/good.npz", "{b}/wide.npz"], "0..255, found 300..300"),
    ("no arr_0", ["{b}/good.npz", "{b}/other.npz"], "has no arr_0"),
    ("not an npz", ["{b}/good.npz", "{b}/text.npz"], "not an .npz"),
    ("missing file", ["{b}/good.npz", "{b}/nope.npz"], "no such file"),
    ("missing weights", ["{b}/good.npz", "{b}/good.npz", "--inception-weights", "{b}/none.pth"],
     "Inception weights not found"),
    ("zero k", ["{b}/good.npz", "{b}/good.npz", "--k", "0"], "must be >= 1"),
]


@pytest.mark.parametrize("name, argv, expect", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2_nothing_created(name, argv, expect, bad_files, capsys):
    argv = [a.format(b=bad_files) for a in argv]
    if "--inception-weights" not in argv:
        argv += ["--inception-weights", str(bad_files / "w.pth")]
    before = _listing(bad_files)
    try:
        code = evaluate.cli(argv)
    except SystemExit as stop:
        code = stop.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), lines
    assert expect in lines[0], lines[0]
    assert _listing(bad_files) == before
