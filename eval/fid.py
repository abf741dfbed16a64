"""FID with clean-fid's preprocessing (``mode="clean"``: PIL bicubic resize to 299 in float), SPEC §5.

- Features come from an injectable extractor: any module mapping [B, 3, 299, 299] floats in [0, 255] to
  [B, D] (clean-fid's ``custom_feat_extractor`` contract). Default: clean-fid's Inception-v3 torchscript;
  offline: ``eval.backbones.efficientnet_fid`` (labelled NOT Inception).
- Reference statistics (mu, sigma) are computed once per (reference folder, backbone, mode) and cached as
  ``<cache>/fid_stats/*.npz`` where ``<cache>`` is the config's ``cache_dir``, else ``$SKRR_CACHE``, else
  ``~/.cache/skrr`` -- never inside site-packages, where clean-fid's own ``make_custom_stats`` writes.
- Only ``mode="clean"`` is accepted. clean-fid's ``legacy_tensorflow`` feeds unresized images to an Inception
  that resizes inside the network, and ``legacy_pytorch`` uses pytorch-fid's re-ported Inception weights;
  neither matches our extractor contract (299x299 in, resize outside), so ``check_mode`` refuses them in one
  line instead of failing on Inception's 299-pixel assert or scoring with the wrong network.
- The Fréchet distance is our own closed form (symmetric eigendecompositions, float64) rather than
  clean-fid's ``frechet_distance``, which calls ``scipy.linalg.sqrtm(disp=False)`` (removed in SciPy 1.18).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval import EvalError, MissingAssetError
from eval.generate import complete_manifest
from skrr.io import atomic_write_bytes

log = logging.getLogger(__name__)

MODE = "clean"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_NAME = "inception-v3 (clean-fid torchscript, pool3 2048-d)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_mode(mode: str, key: str = "eval.fid.mode") -> str:
    """``mode`` if it is clean-fid's "clean"; otherwise one line naming the setting and the fix."""
    if mode != MODE:
        raise EvalError(f"{key}={mode!r} is not supported: clean-fid's legacy modes need its own legacy Inception "
                        f"pipeline, not this extractor (299x299 resized outside); use {key}=clean (clean-fid, "
                        f"as the paper's FID)")
    return mode


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where computed statistics live: ``cache_dir``, else ``$SKRR_CACHE``, else ``~/.cache/skrr``."""
    root = cache_dir or os.environ.get("SKRR_CACHE") or Path.home() / ".cache" / "skrr"
    return Path(root).expanduser()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows are samples) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise EvalError(f"FID needs at least 2 feature rows, got shape {f.shape}; generate more images")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between two Gaussians.

    Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the inner matrix is symmetric PSD, so two ``eigh`` calls
    give it without a general matrix square root (and without imaginary round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if np.array_equal(mu1, mu2) and np.array_equal(s1, s2):
        return 0.0  # identical statistics (a set against itself): exactly 0, not round-off of either sign
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def image_features(files: list[Path], extractor: Any, device: str | torch.device = "cpu", batch_size: int = 32,
                   mode: str = MODE, num_workers: int = 0) -> np.ndarray:
    """Features of image files through clean-fid's resize pipeline (no DataParallel; workers only decode/resize)."""
    from cleanfid.fid import get_files_features

    check_mode(mode)
    if not files:
        raise EvalError("no images to compute FID features from; check the image folder")
    with torch.inference_mode():
        return get_files_features([str(f) for f in files], model=extractor, num_workers=num_workers,
                                  batch_size=batch_size, device=torch.device(device), mode=mode, verbose=False)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def reference_files(ref_dir: str | Path) -> list[Path]:
    """Image files of a reference folder (recursive, sorted)."""
    ref = Path(ref_dir).expanduser()
    if not ref.is_dir():
        raise MissingAssetError(f"FID reference folder {ref} not found; build it with scripts/prepare_refs.py "
                                f"and set eval.fid.ref_dir")
    files = sorted(p for p in ref.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise MissingAssetError(f"FID reference folder {ref} holds no images; run scripts/prepare_refs.py")
    return files


def reference_stats(ref_dir: str | Path, extractor: Any, backbone: str, mode: str = MODE,
                    device: str | torch.device = "cpu", batch_size: int = 32,
                    cache_dir: str | Path | None = None,
                    num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, int, Path]:
    """(mu, sigma, n, cache file) of a reference folder; computed once, then read from the cache.

    The cache key covers the backbone name, the mode and every file's relative name, size and mtime.
    """
    ref = Path(ref_dir).expanduser()
    files = reference_files(ref)
    listing = [(str(f.relative_to(ref)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([backbone, mode, listing]).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "fid_stats" / f"{_slug(ref.name)}_{_slug(backbone)}_{mode}_{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            log.info("FID reference statistics from cache %s", path)
            return z["mu"], z["sigma"], int(z["n"]), path
    log.info("FID reference statistics: %d images in %s with %s", len(files), ref, backbone)
    mu, sigma = gaussian_stats(image_features(files, extractor, device, batch_size, mode, num_workers))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=len(files), backbone=backbone, mode=mode, ref_dir=str(ref))
    atomic_write_bytes(path, buf.getvalue())
    return mu, sigma, len(files), path


@dataclass(frozen=True)
class FidResult:
    """FID of one run against a reference set, with everything needed to compare it to another."""

    value: float
    n_images: int
    n_ref: int
    backbone: str
    mode: str
    ref_stats: str


def fid_dir(extractor: Any, images_dir: str | Path, ref_dir: str | Path, backbone: str | None = None,
            mode: str = MODE, device: str | torch.device = "cpu", batch_size: int = 32,
            cache_dir: str | Path | None = None, num_workers: int = 0) -> FidResult:
    """FID between the images listed in ``images_dir/manifest.jsonl`` and the reference folder."""
    check_mode(mode)
    backbone = backbone or getattr(extractor, "name", type(extractor).__name__)
    images_dir = Path(images_dir)
    files = [images_dir / r["file"] for r in complete_manifest(images_dir)]
    mu_r, sigma_r, n_ref, path = reference_stats(ref_dir, extractor, backbone, mode, device, batch_size, cache_dir,
                                                 num_workers)
    mu_g, sigma_g = gaussian_stats(image_features(files, extractor, device, batch_size, mode, num_workers))
    value = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    log.info("FID %.3f (%d images vs %d references, %s, mode=%s)", value, len(files), n_ref, backbone, mode)
    return FidResult(value, len(files), n_ref, backbone, mode, str(path))


class _Inception(torch.nn.Module):
    """clean-fid's Inception-v3 torchscript (expects 299x299 in [0, 255]), named for the result JSON."""

    name = INCEPTION_NAME

    def __init__(self, folder: Path) -> None:
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W

        self.net = InceptionV3W(str(folder), download=False, resize_inside=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def inception(device: str | torch.device = "cpu", weights_dir: str | Path | None = None,
              allow_download: bool = True) -> torch.nn.Module:
    """clean-fid's Inception-v3 feature extractor; weights from ``weights_dir``, clean-fid's ``/tmp`` or a download."""
    folder = Path(weights_dir).expanduser() if weights_dir else cache_root() / "inception"
    for candidate in (folder, Path("/tmp")):  # /tmp is where clean-fid itself looks on Linux
        if (candidate / INCEPTION_FILE).is_file():
            return _Inception(candidate).to(device).eval()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not allow_download or offline:
        raise MissingAssetError(f"Inception weights {INCEPTION_FILE} not in {folder} or /tmp; download "
                                f"{INCEPTION_URL} there, or use eval=offline")
    folder.mkdir(parents=True, exist_ok=True)
    # torch's downloader writes to a temp file and renames: an interrupted download leaves no half file.
    torch.hub.download_url_to_file(INCEPTION_URL, str(folder / INCEPTION_FILE))
    return _Inception(folder).to(device).eval()
