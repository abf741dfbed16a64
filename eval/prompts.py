"""Prompt sets: COCO-30k (and its 1k ablation subset), GenEval's 553 prompts, plain prompt files (SPEC §5).

Nothing is downloaded: the user points at files they fetched once.
- COCO 2014 val captions: ``annotations/captions_val2014.json`` from annotations_trainval2014.zip
  (https://cocodataset.org/#download); the images (val2014.zip) are only needed for FID references
  (scripts/prepare_refs.py).
- GenEval: ``prompts/evaluation_metadata.jsonl`` of https://github.com/djghosh13/geneval (553 lines).

COCO selection (choice, recorded by its seed): sort the image ids that have captions, draw ``n`` of them
without replacement with ``numpy.random.default_rng(seed)``, then draw one caption per image with the
same generator. The 1k ablation subset is the first 1,000 of that draw, so it is nested in the 30k.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval import EvalError, MissingAssetError

log = logging.getLogger(__name__)

COCO_URL = "https://cocodataset.org/#download (annotations_trainval2014.zip -> annotations/captions_val2014.json)"
GENEVAL_URL = "https://github.com/djghosh13/geneval/blob/main/prompts/evaluation_metadata.jsonl"
GENEVAL_NUM_PROMPTS = 553  # SPEC §5: 80 + 99 + 80 + 94 + 100 + 100
TINY_PROMPTS = Path(__file__).parent / "data" / "tiny_prompts.txt"


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts with per-prompt metadata (COCO image id, GenEval include/exclude rules)."""

    name: str
    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if self.metadata and len(self.metadata) != len(self.prompts):
            raise EvalError(f"prompt set {self.name!r}: {len(self.metadata)} metadata rows for "
                            f"{len(self.prompts)} prompts; rebuild it from its source file")

    def __len__(self) -> int:
        return len(self.prompts)

    def meta(self, i: int) -> dict[str, Any]:
        """Metadata of prompt ``i`` (empty dict when the set has none)."""
        return self.metadata[i] if self.metadata else {}

    def digest(self) -> str:
        """Short hash of prompts and metadata: two runs scored on one set must agree on it."""
        blob = json.dumps([self.prompts, self.metadata], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def subset(self, n: int, name: str | None = None) -> PromptSet:
        """The first ``n`` prompts (the COCO 1k ablation subset is the head of the 30k draw)."""
        if n > len(self):
            raise EvalError(f"prompt set {self.name!r} has {len(self)} prompts, cannot take {n}; lower n")
        return PromptSet(name or f"{self.name}_{n}", self.prompts[:n], self.metadata[:n], self.source)


def _require(path: str | Path | None, what: str, where: str, key: str) -> Path:
    """Return ``path`` as a Path or raise one line naming the file, where to get it and the config key."""
    if path is None or str(path) in ("", "None", "null"):
        raise MissingAssetError(f"{what}: no path given; set {key} (get it from {where})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingAssetError(f"{what} not found at {p}; get it from {where} and set {key}")
    return p


def _clean(text: str) -> str:
    """Collapse whitespace and newlines (a few COCO captions carry them)."""
    return re.sub(r"\s+", " ", text).strip()


def load_coco_captions(path: str | Path | None, n: int = 30_000, seed: int = 0, name: str = "coco30k",
                       key: str = "eval.<metric>.prompts.path") -> PromptSet:
    """``n`` COCO val2014 images with one caption each, drawn with ``seed`` (SPEC §5: 30k, fixed seed)."""
    p = _require(path, "COCO captions file captions_val2014.json", COCO_URL, key)
    data = json.loads(p.read_text())
    files = {im["id"]: im["file_name"] for im in data.get("images", [])}
    caps: dict[int, list[tuple[int, str]]] = {}
    for ann in data.get("annotations", []):
        caps.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"]))
    ids = sorted(caps)
    if n > len(ids):
        raise EvalError(f"{p} has captions for {len(ids)} images, fewer than n={n}; "
                        f"lower n or use captions_val2014.json")
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in rng.choice(len(ids), size=n, replace=False)]
    prompts, meta = [], []
    for image_id in chosen:
        options = sorted(caps[image_id])  # by annotation id, so the draw does not depend on file order
        _, caption = options[int(rng.integers(len(options)))]
        prompts.append(_clean(caption))
        meta.append({"image_id": int(image_id),
                     "file_name": files.get(image_id, f"COCO_val2014_{image_id:012d}.jpg")})
    log.info("COCO captions: %d images drawn with seed %d from %s", n, seed, p)
    return PromptSet(name, prompts, meta, str(p))


def load_geneval_metadata(path: str | Path | None, name: str = "geneval",
                          key: str = "eval.geneval.prompts.path") -> PromptSet:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object per line with tag, include, exclude, prompt."""
    p = _require(path, "GenEval evaluation_metadata.jsonl", GENEVAL_URL, key)
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows) if "prompt" not in r or "tag" not in r]
    if bad:
        raise EvalError(f"{p}: line {bad[0] + 1} has no 'prompt'/'tag'; use GenEval's evaluation_metadata.jsonl")
    if len(rows) != GENEVAL_NUM_PROMPTS:
        log.warning("%s has %d prompts, not GenEval's %d; scores are not comparable to the paper",
                    p, len(rows), GENEVAL_NUM_PROMPTS)
    return PromptSet(name, [r["prompt"] for r in rows], rows, str(p))


def load_prompt_file(path: str | Path | None, name: str | None = None,
                     key: str = "eval.<metric>.prompts.path") -> PromptSet:
    """One prompt per non-empty line (lines starting with '#' are comments)."""
    p = _require(path, "prompt file", "any text file with one prompt per line", key)
    lines = [_clean(s) for s in p.read_text().splitlines()]
    prompts = [s for s in lines if s and not s.startswith("#")]
    if not prompts:
        raise EvalError(f"prompt file {p} has no prompts; write one prompt per line")
    return PromptSet(name or p.stem, prompts, [], str(p))


def tiny_prompts() -> PromptSet:
    """16 short prompts written for this project: offline demo and tests."""
    return load_prompt_file(TINY_PROMPTS, name="tiny")


def load_prompt_set(spec: Mapping[str, Any], key: str = "eval.<metric>.prompts.path") -> PromptSet:
    """A prompt set from a config node: ``kind`` (coco | geneval | file | tiny), ``path``, ``n``, ``seed``, ``name``.

    COCO always draws ``draw`` (default 30,000) images and keeps the first ``n``, so subsets are nested.
    """
    kind = spec.get("kind", "file")
    name = spec.get("name")
    n = spec.get("n")
    if kind == "coco":
        # Always draw the full 30k and take the head, so every COCO subset is nested in COCO-30k.
        ps = load_coco_captions(spec.get("path"), n=int(spec.get("draw", 30_000)),
                                seed=int(spec.get("seed", 0)), name=name or "coco30k", key=key)
    elif kind == "geneval":
        ps = load_geneval_metadata(spec.get("path"), name=name or "geneval", key=key)
    elif kind == "file":
        ps = load_prompt_file(spec.get("path"), name=name, key=key)
    elif kind == "tiny":
        ps = tiny_prompts()
    else:
        raise EvalError(f"unknown prompt set kind {kind!r}; use coco, geneval, file or tiny")
    if n is not None and int(n) < len(ps):
        ps = ps.subset(int(n), name=name or ps.name)
    elif name and name != ps.name:
        ps = PromptSet(name, ps.prompts, ps.metadata, ps.source)
    return ps
