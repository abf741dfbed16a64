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


def test_frechet_distance_of_nearly_identical_statistics_is_zero_through_the_formula():
    # Not array-equal, so the "identical statistics" shortcut is skipped and the eigen path must give ~0.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + 0.5 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, s, mu + 1e-9, s + 1e-9 * np.eye(6)) == pytest.approx(0.0, abs=1e-6)
    # ... and one unit of mean shift along one axis adds exactly 1.
    shift = np.zeros(6)
    shift[2] = 1.0
    assert frechet_distance(mu, s, mu + shift, s + 1e-9 * np.eye(6)) == pytest.approx(1.0, abs=1e-6)


class _Recording(torch.nn.Module):
    """Returns a grid of raw input pixels, so the features are the resized image itself."""

    name = "test-pixel-grid"

    def forward(self, x):
        assert x.shape[-2:] == (299, 299), x.shape
        return x[:, :, ::37, ::37].flatten(1).double()


def _clean_resize(path):
    """clean-fid's "clean" resize written out: each channel as a float32 PIL image, bicubic to 299, clipped."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    chans = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
             for c in range(3)]
    return np.stack(chans).clip(0, 255)


def test_features_see_clean_fids_clean_resize_not_a_legacy_one(tmp_path):
    from eval.fid import image_features

    _write_images(tmp_path / "run", 3, seed=5)
    files = sorted((tmp_path / "run" / "images").glob("*.png"))
    got = image_features(files, _Recording(), batch_size=2)
    expected = np.stack([_clean_resize(f)[:, ::37, ::37].reshape(-1) for f in files])
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("mode", ["legacy_pytorch", "legacy_tensorflow"])
def test_legacy_modes_are_refused_in_one_line_before_any_work(tmp_path, mode):
    from eval import EvalError
    from eval.score import metric_specs

    _write_images(tmp_path / "run", 3, seed=0)
    feats = _Features()
    with pytest.raises(EvalError, match=f"eval.fid.mode='{mode}' is not supported.*mode=clean") as err:
        fid_dir(feats, tmp_path / "run", tmp_path / "run" / "images", mode=mode, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and feats.calls == 0 and not (tmp_path / "cache").exists()
    with pytest.raises(EvalError, match=f"eval.fid1k.mode='{mode}'"):
        metric_specs({"fid1k": {"metric": "fid", "mode": mode}})


def test_fid_agrees_with_torchmetrics_on_the_same_features(tmp_path):
    # Independent implementation of the statistics and the matrix square root (torchmetrics' FID, float64).
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Pooled(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.double() / 255.0, 2).flatten(1)

    rng = np.random.default_rng(6)
    real = rng.integers(0, 256, size=(40, 3, 8, 8), dtype=np.uint8)
    fake = np.clip(real.astype(int) * 0.7 + rng.integers(0, 60, size=real.shape), 0, 255).astype(np.uint8)
    tm = FrechetInceptionDistance(feature=Pooled(), normalize=False).double()
    tm.update(torch.from_numpy(real), real=True)
    tm.update(torch.from_numpy(fake), real=False)
    with torch.no_grad():
        fr, ff = (Pooled()(torch.from_numpy(a)).numpy() for a in (real, fake))
    ours = frechet_distance(*gaussian_stats(ff), *gaussian_stats(fr))
    assert ours > 1e-3 and ours == pytest.approx(float(tm.compute()), rel=1e-6)


def test_reference_cache_follows_the_folder_contents_and_the_full_backbone_name(tmp_path):
    _write_images(tmp_path / "ref", 8, seed=3, with_manifest=False)
    feats = _Features()
    long = "a backbone whose name is longer than the forty-character slug"
    _, _, _, path = reference_stats(tmp_path / "ref", feats, long + " v1", cache_dir=tmp_path / "cache")
    _, _, _, other = reference_stats(tmp_path / "ref", feats, long + " v2", cache_dir=tmp_path / "cache")
    assert other != path  # same slug, different backbone: never the same statistics file
    mu, _, _, _ = reference_stats(tmp_path / "ref", feats, long + " v1", cache_dir=tmp_path / "cache")
    # Replace one reference image: the cached statistics no longer describe the folder and are recomputed.
    first = sorted((tmp_path / "ref" / "images").glob("*.png"))[0]
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(first)
    mu2, _, _, path2 = reference_stats(tmp_path / "ref", feats, long + " v1", cache_dir=tmp_path / "cache")
    assert path2 != path and not np.allclose(mu, mu2)
