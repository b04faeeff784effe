"""Our 2015 Inception against torch-fidelity's FeatureExtractorInceptionV3 on the same random weights.

torch-fidelity's package __init__ imports torchvision (which cannot load beside the CPU torch on this
machine), so its module is loaded under an empty stand-in package: only the module file and the two
small helper modules it imports run. `make test` puts torch-fidelity (--no-deps) in its own folder,
<venv>/torch-fidelity, outside sys.path: its wheel also installs a top-level `tests` package, which
would shadow this repository's `tests` in site-packages.
"""
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast.evaluation import FeatureExtractor, InceptionWeightsMissing
from dit_fast.evaluation.inception import resize_bilinear_tf1
from tests.evaluation_helpers import random_inception, save_random_weights


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    """torch-fidelity's inception module, imported without its package __init__."""
    folder = Path(os.environ.get("TORCH_FIDELITY_DIR", Path(sys.prefix) / "torch-fidelity")) / "torch_fidelity"
    spec = importlib.util.find_spec("torch_fidelity")
    locations = [str(folder)] if folder.is_dir() else list(spec.submodule_search_locations) if spec else None
    if not locations:
        pytest.fail(f"torch-fidelity not found at {folder} (set TORCH_FIDELITY_DIR): `make test` installs it, "
                    f"or pip install --no-deps --target {folder.parent} torch-fidelity==0.4.0")
    saved = {name: mod for name, mod in sys.modules.items() if name.startswith("torch_fidelity")}
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = locations
    sys.modules["torch_fidelity"] = stand_in
    try:
        yield importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        for name in [n for n in sys.modules if n.startswith("torch_fidelity")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=3)


def test_features_equal_torch_fidelity_on_the_same_weights(fidelity, weights, one_torch_thread):
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                  feature_extractor_weights_path=str(weights))
    spatial = {}
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: spatial.setdefault("x", out))
    images = np.random.default_rng(0).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)  # odd, non-square
    with torch.inference_mode():
        pool, logits = theirs(torch.from_numpy(images).permute(0, 3, 1, 2))
    extractor = FeatureExtractor(weights, device="cpu")
    ours = extractor(images)
    np.testing.assert_array_equal(extractor(torch.from_numpy(images)).pool, ours.pool)  # tensors in too
    assert pool.abs().mean() > 0.1 and pool.std() > 0.01  # the random weights give live features
    want_spatial = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC flattening
    for name, got, want in (("pool", ours.pool, pool), ("spatial", ours.spatial, want_spatial),
                            ("logits", ours.logits, logits)):
        np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
    assert ours.spatial.shape == (2, 17 * 17 * 7)


def test_resize_equals_torch_fidelity_tf1_resize(fidelity, one_torch_thread):
    resize = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.rand(2, 3, 32, 45) * 255
    for size in (299, 17):  # up and down
        want = resize.interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
        torch.testing.assert_close(resize_bilinear_tf1(x, size), want, rtol=0, atol=0)


def test_resize_is_tf1_not_half_pixel():
    # TF1 samples output pixel i at i * in/out: 2 -> 4 gives [a, (a+b)/2, b, b] (corners aligned left)
    x = torch.tensor([[[[0.0, 8.0]]]])
    np.testing.assert_array_equal(resize_bilinear_tf1(x.expand(1, 1, 2, 2), 4)[0, 0, 0], [0, 4, 8, 8])


def test_extractor_weights_missing_and_foreign_state_dicts(tmp_path):
    with pytest.raises(InceptionWeightsMissing, match="--inception-weights"):
        FeatureExtractor(tmp_path / "nope.pth")
    bad = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="not the 2015 Inception"):
        FeatureExtractor(bad)


def test_extractor_rejects_non_uint8(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(random_inception(1).state_dict(), weights)
    extractor = FeatureExtractor(weights, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # channels first
