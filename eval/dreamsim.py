"""DreamSim similarity to the dense model: mean of 1 - DreamSim distance(dense image, pruned image) (SPEC §5).

Pairs are the same (prompt index, sample index, seed) in the two runs' manifests. Pixel-identical pairs get
distance 0 without running the model, so the dense run scores exactly 1.0 (the model's own cosine of an
embedding with itself is 1 - 1e-7-ish, not 1).

The dreamsim package (0.2.1) downloads its release zip into ``cache_dir`` unless the variant's files are
there, and its DINO branch calls ``torch.hub.load`` after ``torch.hub.set_dir(cache_dir)`` -- a global side
effect. ``load_dreamsim`` checks the files first (and refuses to touch the network when downloads are
off), and restores torch's hub dir afterwards. The backbone is injectable: anything with
``distance(images_a, images_b) -> tensor`` and a ``name`` (offline: ``eval.backbones.efficientnet_perceptual``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval import EvalError, MissingAssetError
from eval.fid import cache_root
from eval.generate import complete_manifest

log = logging.getLogger(__name__)

# What dreamsim 0.2.1 reads from cache_dir per variant (its own download_weights list), plus the two files its
# torch.hub.load of DINO needs when it cannot reach GitHub (hub repo checkout and the DINO checkpoint).
_DINO_HUB = ["facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth"]
REQUIRED_FILES = {
    "ensemble": ["dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
                 "ensemble_lora/adapter_config.json", *_DINO_HUB],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora/adapter_config.json", *_DINO_HUB],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora/adapter_config.json"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora/adapter_config.json"],
}


@contextlib.contextmanager
def restored_hub_dir() -> Iterator[None]:
    """Run a block that may call ``torch.hub.set_dir`` and put the previous hub dir back afterwards."""
    old = torch.hub.get_dir()
    try:
        yield
    finally:
        torch.hub.set_dir(old)


def missing_files(cache_dir: str | Path, dreamsim_type: str = "ensemble") -> list[str]:
    """Files dreamsim needs offline that ``cache_dir`` lacks."""
    if dreamsim_type not in REQUIRED_FILES:
        raise EvalError(f"unknown dreamsim_type {dreamsim_type!r}; use one of {sorted(REQUIRED_FILES)}")
    return [f for f in REQUIRED_FILES[dreamsim_type] if not (Path(cache_dir) / f).exists()]


class DreamSimBackbone:
    """The dreamsim package's model and preprocessing behind ``distance(images_a, images_b)``."""

    def __init__(self, model: Any, preprocess: Any, name: str, device: str | torch.device = "cpu") -> None:
        self.model, self.preprocess, self.name, self.device = model, preprocess, name, torch.device(device)

    @torch.inference_mode()
    def distance(self, images_a: list[Image.Image], images_b: list[Image.Image]) -> torch.Tensor:
        """PIL image pairs -> DreamSim distances (cosine distance of the embeddings)."""
        a = torch.cat([self.preprocess(im) for im in images_a]).to(self.device)
        b = torch.cat([self.preprocess(im) for im in images_b]).to(self.device)
        return self.model(a, b).float().reshape(-1).cpu()


def load_dreamsim(device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                  dreamsim_type: str = "ensemble", allow_download: bool = True) -> DreamSimBackbone:
    """DreamSim (default ``ensemble``: DINO + CLIP + OpenCLIP ViT-B/16 with LoRA) with weights in ``cache_dir``."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "dreamsim"
    missing = missing_files(folder, dreamsim_type)
    if missing and (not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise MissingAssetError(f"DreamSim {dreamsim_type} files missing in {folder}: {', '.join(missing)}; run once "
                                f"online (eval.dreamsim.backbone.allow_download=true) to fill it, or use eval=offline")
    from dreamsim import dreamsim

    folder.mkdir(parents=True, exist_ok=True)
    with restored_hub_dir():
        model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder),
                                     dreamsim_type=dreamsim_type)
    return DreamSimBackbone(model, preprocess, name=f"dreamsim-{dreamsim_type}", device=device)


@dataclass(frozen=True)
class DreamSimResult:
    """Mean 1 - distance over paired images, the backbone, and how many pairs were pixel-identical."""

    value: float
    n_images: int
    backbone: str
    n_identical: int


def _pairs(images_dir: Path, dense_dir: Path) -> list[tuple[Path, Path]]:
    """Match the two manifests image-for-image and check they really are the same prompts and seeds."""
    rows = complete_manifest(images_dir)
    dense = {(r["prompt_idx"], r["sample_idx"]): r for r in complete_manifest(dense_dir)}
    pairs = []
    for r in rows:
        d = dense.get((r["prompt_idx"], r["sample_idx"]))
        if d is None or d["seed"] != r["seed"] or d["prompt"] != r["prompt"]:
            raise EvalError(f"{images_dir} and {dense_dir} are not paired at {r['file']} (prompt or seed differs); "
                            f"generate both from the same prompt set with the same eval seed")
        pairs.append((images_dir / r["file"], dense_dir / d["file"]))
    return pairs


def dreamsim_dir(backbone: Any, images_dir: str | Path, dense_dir: str | Path, batch_size: int = 16) -> DreamSimResult:
    """Mean 1 - distance between each image of ``images_dir`` and the dense run's image with the same seed."""
    images_dir, dense_dir = Path(images_dir), Path(dense_dir)
    pairs = _pairs(images_dir, dense_dir)
    name = getattr(backbone, "name", type(backbone).__name__)
    if images_dir.resolve() == dense_dir.resolve():  # the dense run against itself: exactly 1 by definition
        return DreamSimResult(1.0, len(pairs), name, len(pairs))
    sims = np.ones(len(pairs))
    todo: list[int] = []
    loaded: dict[int, tuple[Image.Image, Image.Image]] = {}
    n_identical = 0

    def flush() -> None:
        d = backbone.distance([loaded[i][0] for i in todo], [loaded[i][1] for i in todo])
        sims[todo] = 1.0 - d.double().numpy()
        todo.clear()
        loaded.clear()

    for i, (a, b) in enumerate(pairs):
        ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
        if ia.size == ib.size and np.array_equal(np.asarray(ia), np.asarray(ib)):
            n_identical += 1  # distance exactly 0: sims[i] stays 1.0
            continue
        todo.append(i)
        loaded[i] = (ia, ib)
        if len(todo) == batch_size:
            flush()
    if todo:
        flush()
    value = float(sims.mean())
    log.info("DreamSim %.4f over %d pairs (%d identical, %s)", value, len(pairs), n_identical, name)
    return DreamSimResult(value, len(pairs), name, n_identical)
