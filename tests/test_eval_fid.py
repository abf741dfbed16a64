"""FID: the closed form on synthetic Gaussians, a set against itself, the reference-statistics cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval import MissingAssetError
from eval.fid import fid_dir, frechet_distance, gaussian_stats, inception, reference_stats


def test_frechet_distance_closed_form_for_commuting_covariances():
    # Diagonal covariances commute, so Tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i): FID is known exactly.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.5, 3.0, 6), rng.uniform(0.5, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_two_synthetic_feature_sets_equals_closed_form_of_their_statistics():
    rng = np.random.default_rng(2)
    f1 = rng.normal(0.0, 1.0, size=(4000, 3))
    f2 = rng.normal(0.5, 2.0, size=(4000, 3))
    mu1, s1 = gaussian_stats(f1)
    mu2, s2 = gaussian_stats(f2)
    # Population values: identity vs 4 I, means 0 vs 0.5 -> 3 x 0.25 + 3 x (1 + 4 - 2 x 2) = 3.75.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(3.75, abs=0.25)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


class _Features(torch.nn.Module):
    """A cheap deterministic extractor (channel means and spreads of 4x4 pooled images) that counts its calls."""

    name = "test-pooled-pixels"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2)
        return pooled.flatten(1)


def _write_images(folder, n, seed, with_manifest=True):
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        name = f"images/{i:05d}_00.png"
        Image.fromarray(arr).save(folder / name)
        rows.append({"file": name, "prompt_idx": i, "sample_idx": 0, "seed": i, "prompt": "p"})
    if with_manifest:
        import json

        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fid_of_a_set_against_itself_is_zero_and_against_another_set_is_not(tmp_path):
    _write_images(tmp_path / "run", 24, seed=0)
    _write_images(tmp_path / "other", 24, seed=1)
    feats = _Features()
    same = fid_dir(feats, tmp_path / "run", tmp_path / "run" / "images", cache_dir=tmp_path / "cache")
    other = fid_dir(feats, tmp_path / "run", tmp_path / "other" / "images", cache_dir=tmp_path / "cache")
    assert same.value == pytest.approx(0.0, abs=1e-8)
    assert other.value > 1e-4
    assert same.mode == "clean" and same.backbone == "test-pooled-pixels" and same.n_images == 24


def test_reference_statistics_are_cached_outside_site_packages_and_reused(tmp_path):
    _write_images(tmp_path / "ref", 8, seed=3, with_manifest=False)
    feats = _Features()
    mu, sigma, n, path = reference_stats(tmp_path / "ref", feats, feats.name, cache_dir=tmp_path / "cache")
    calls = feats.calls
    mu2, sigma2, n2, path2 = reference_stats(tmp_path / "ref", feats, feats.name, cache_dir=tmp_path / "cache")
    assert calls > 0 and feats.calls == calls  # second call read the cache
    assert path == path2 and path.is_relative_to(tmp_path / "cache") and n == n2 == 8
    np.testing.assert_array_equal(mu, mu2)
    # A different backbone name is a different cache entry.
    _, _, _, path3 = reference_stats(tmp_path / "ref", feats, "another-backbone", cache_dir=tmp_path / "cache")
    assert path3 != path and feats.calls > calls


def test_efficientnet_backbone_gives_labelled_1280d_features_that_separate_photos():
    import skimage.data

    from eval.backbones import efficientnet_fid

    net = efficientnet_fid("cpu")
    assert "NOT Inception" in net.name
    imgs = [skimage.data.chelsea(), skimage.data.coffee()]
    x = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(a).resize((299, 299)), np.float32)).permute(2, 0, 1)
                     for a in imgs])
    with torch.no_grad():
        f = net(x)
    assert f.shape == (2, 1280)
    # Real weights: two different photos are far apart; one photo gives the same features alone or in a batch.
    assert torch.nn.functional.cosine_similarity(f[0], f[1], dim=0) < 0.9
    with torch.no_grad():
        torch.testing.assert_close(net(x[:1]), f[:1], atol=1e-4, rtol=1e-4)


def test_inception_without_weights_offline_raises_one_clear_line(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if os.path.exists("/tmp/inception-2015-12-05.pt"):
        pytest.skip("clean-fid's Inception weights are present on this machine")
    with pytest.raises(MissingAssetError, match="inception-2015-12-05.pt") as err:
        inception("cpu", weights_dir=tmp_path / "none")
    assert "\n" not in str(err.value)
