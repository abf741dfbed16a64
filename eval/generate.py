"""Prompts x seeds -> PNG images on disk, paired image-for-image between the dense and every pruned run.

On-disk contract (one folder per cell and prompt set; the scorers read only this):

    <out_dir>/generation.json      settings, prompt-set name/digest/source, caller's identity info
    <out_dir>/manifest.jsonl       one row per image: file, prompt_idx, sample_idx, seed, prompt[, meta]
    <out_dir>/images/{prompt_idx:05d}_{sample_idx:02d}.png

Pairing: image (p, s) starts from noise drawn by its own CPU ``torch.Generator`` seeded with
``image_seed(seed, p, s)``, so the dense and a pruned run get the same starting noise for the same
prompt, whatever the batch size or device (diffusers draws one latent per generator in the list).
A rerun generates only the missing files; every PNG is written to a temp name then renamed, so a file
that exists is complete. A folder made with other settings is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eval import EvalError
from eval.prompts import PromptSet
from skrr.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
IMAGES = "images"


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; defaults are the paper's PixArt-Σ setup (SPEC §5: 512x512, 20 steps, guidance 4.5)."""

    height: int = 512
    width: int = 512
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 8
    # Extra keyword arguments for the pipeline call (e.g. use_resolution_binning=False, max_sequence_length).
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields that change pixels (batch size does not, by construction)."""
        d = asdict(self)
        d.pop("batch_size")
        return d


@dataclass(frozen=True)
class ImageRecord:
    """One planned image: which prompt, which sample, which seed, which file."""

    prompt_idx: int
    sample_idx: int
    seed: int
    prompt: str
    file: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    """What a generate call did: where, how many images in all, how many it had to make."""

    out_dir: Path
    n_images: int
    n_generated: int
    seconds: float


def image_seed(seed: int, prompt_idx: int, sample_idx: int) -> int:
    """Seed of image (prompt_idx, sample_idx) under run seed ``seed``: a 63-bit hash, distinct per image."""
    digest = hashlib.sha256(f"skrr-image:{seed}:{prompt_idx}:{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def image_name(prompt_idx: int, sample_idx: int) -> str:
    """Relative path of an image inside the output folder."""
    return f"{IMAGES}/{prompt_idx:05d}_{sample_idx:02d}.png"


def plan_images(prompts: PromptSet, settings: GenerationSettings) -> list[ImageRecord]:
    """Every image a run makes, prompt-major, in a fixed order."""
    return [ImageRecord(p, s, image_seed(settings.seed, p, s), prompts.prompts[p], image_name(p, s), prompts.meta(p))
            for p in range(len(prompts)) for s in range(settings.samples_per_prompt)]


def read_manifest(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``manifest.jsonl`` (one dict per image)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise EvalError(f"no {MANIFEST} in {out_dir}; run the generate stage first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def complete_manifest(out_dir: str | Path) -> list[dict[str, Any]]:
    """Manifest rows, after checking that every listed image exists (scorers call this)."""
    out_dir = Path(out_dir)
    rows = read_manifest(out_dir)
    missing = [r["file"] for r in rows if not (out_dir / r["file"]).is_file()]
    if missing:
        raise EvalError(f"{len(missing)} of {len(rows)} images missing in {out_dir} (first: {missing[0]}); "
                        f"rerun the generate stage")
    return rows


def _settings_doc(prompts: PromptSet, settings: GenerationSettings, pipeline: Any,
                  extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"prompt_set": {"name": prompts.name, "n": len(prompts), "digest": prompts.digest(),
                           "source": prompts.source},
            "settings": settings.identity(),
            "pipeline": type(pipeline).__name__,
            "extra": dict(extra or {})}


def _prepare_folder(out_dir: Path, doc: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder made with other settings; with ``overwrite`` wipe it first."""
    path = out_dir / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(doc))
        # The pipeline's class name is a note, not identity: a wrapper around the same pipeline may resume.
        diff = sorted(k for k in new if k != "pipeline" and old.get(k) != new[k])
        if diff:
            if not overwrite:
                raise EvalError(f"{out_dir} holds images made with other {', '.join(diff)}; "
                                f"use another folder or pass overwrite=true")
            log.warning("overwrite: removing images made with other settings in %s", out_dir)
            shutil.rmtree(out_dir / IMAGES, ignore_errors=True)
    atomic_write_json(path, doc)


def _save_png(image: Any, path: Path) -> None:
    """Write a PIL image to a temp name in the same folder, then rename (a present file is whole)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.inference_mode()
def generate_images(pipeline: Any, prompts: PromptSet, out_dir: str | Path,
                    settings: GenerationSettings = GenerationSettings(), device: str | torch.device | None = None,
                    extra: Mapping[str, Any] | None = None, overwrite: bool = False,
                    progress: bool = True) -> GenerationResult:
    """Generate the missing images of ``prompts`` x ``samples_per_prompt`` into ``out_dir`` with any diffusers pipeline.

    ``extra`` is the caller's identity of the run (pipeline id, plan hash, ...): a folder made under other
    identity info is refused, so images of one plan are never scored as another's. ``device``, when given,
    moves the pipeline there; noise is always drawn on CPU so runs on different devices start alike.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _prepare_folder(out_dir, _settings_doc(prompts, settings, pipeline, extra), overwrite)
    (out_dir / IMAGES).mkdir(exist_ok=True)
    records = plan_images(prompts, settings)
    rows = [{k: v for k, v in asdict(r).items() if k != "meta" or v} for r in records]
    atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))

    todo = [r for r in records if not (out_dir / r.file).is_file()]
    log.info("%s: %d images planned, %d present, %d to generate", out_dir, len(records),
             len(records) - len(todo), len(todo))
    if device is not None:
        pipeline.to(device)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"generate {prompts.name}", disable=not progress)
    for i in range(0, len(todo), settings.batch_size):
        batch = todo[i:i + settings.batch_size]
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        out = pipeline(prompt=[r.prompt for r in batch], height=settings.height, width=settings.width,
                       num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                       num_images_per_prompt=1, generator=generators, output_type="pil",
                       **dict(settings.call_kwargs))
        if len(out.images) != len(batch):
            raise EvalError(f"pipeline returned {len(out.images)} images for {len(batch)} prompts; "
                            f"check call_kwargs (num_images_per_prompt must stay 1)")
        for record, image in zip(batch, out.images):
            _save_png(image, out_dir / record.file)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    if todo:
        log.info("%s: generated %d images in %.1f s", out_dir, len(todo), seconds)
    return GenerationResult(out_dir, len(records), len(todo), seconds)


def export_geneval_layout(out_dir: str | Path, dest: str | Path) -> Path:
    """Copy a GenEval run into the official evaluator's layout (``<dest>/<p:05d>/metadata.jsonl, samples/<s:04d>.png``).

    For cross-checking our scorer against djghosh13/geneval's ``evaluate_images.py`` on a machine with mmdet.
    """
    out_dir, dest = Path(out_dir), Path(dest)
    for row in read_manifest(out_dir):
        if "meta" not in row:
            raise EvalError(f"{out_dir} has no GenEval metadata in its manifest; generate from the geneval prompt set")
        folder = dest / f"{row['prompt_idx']:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metadata.jsonl", json.dumps(row["meta"]) + "\n")
        shutil.copyfile(out_dir / row["file"], folder / "samples" / f"{row['sample_idx']:04d}.png")
    return dest
