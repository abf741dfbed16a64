"""Calibration prompts and the discrepancy every search method minimises.

Skrr's metric (SPEC §2, paper Eq. 3-4): D = MSE(proj(E(C)), proj(E'(C))) + MSE(proj(E(∅)), proj(E'(∅))),
with proj the denoiser's own caption projection, prompts padded as the pipeline pads, mean over every
element of [N, L, d] (padding included). The ablations of Table A13 are flags: cosine instead of MSE,
no projection, no null prompt, valid-token mask. Dense features are computed once and cached.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from skrr.plan import PruningPlan
from skrr.surgery import StackRunner, default_granularity

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "calib_prompts.txt"
METRICS = ("mse", "cosine")


class CalibrationError(ValueError):
    """A calibration prompt file that is missing, empty or unreadable."""


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a file: one per line (.txt), JSON lines (.jsonl) or a CSV column (.csv)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration prompt file {path} does not exist; set calib.prompts=<file> "
                               f"(one prompt per line, .jsonl or .csv)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{n} is not valid JSON ({err.msg})") from err
            prompts.append(_field(row, column, f"{path}:{n}"))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            prompts = [_field(row, column, f"{path}:{n}") for n, row in enumerate(csv.DictReader(f), start=2)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise CalibrationError(f"calibration prompt file {path} holds no prompts")
    return prompts


def _field(row: Any, column: str | None, where: str) -> str:
    if isinstance(row, str):
        return row.strip()
    for key in ([column] if column else ["prompt", "caption", "text"]):
        if isinstance(row, dict) and key in row:
            return str(row[key]).strip()
    raise CalibrationError(f"{where} has no column {column or 'prompt/caption/text'!r}; set calib.column")


def sample_prompts(prompts: Sequence[str], num: int | None, seed: int) -> list[str]:
    """A seeded sample of ``num`` prompts (all of them, in file order, when num is None or larger)."""
    if num is None or num >= len(prompts):
        return list(prompts)
    if num <= 0:
        raise CalibrationError(f"num_calib_prompts must be positive, got {num}")
    idx = sorted(random.Random(seed).sample(range(len(prompts)), num))
    return [prompts[i] for i in idx]


def prompt_hash(prompts: Sequence[str]) -> str:
    """Short hash of a prompt set, recorded in every plan calibrated on it."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:12]


@dataclass
class Batch:
    """Token ids and attention mask of one batch of prompts, padded as the pipeline pads."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class CalibrationSet:
    """Tokenized calibration prompts + ∅, cached dense features, and ``discrepancy(plan)``."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, prompts: Sequence[str],
                 projection: nn.Module | None = None, *, max_length: int = 300, metric: str = "mse",
                 use_projection: bool = True, null_prompt: bool = True, token_mask: bool = False,
                 batch_size: int = 16, granularity: str | None = None, device: str | torch.device = "cpu"):
        if metric not in METRICS:
            raise ValueError(f"calib.metric must be one of {METRICS}, got {metric!r}")
        if use_projection and projection is None:
            raise ValueError("use_projection=True needs the denoiser's caption projection (SPEC §2)")
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.max_length = max_length
        self.metric = metric
        self.use_projection = use_projection
        self.null_prompt = null_prompt
        self.token_mask = token_mask
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = next(encoder.parameters()).dtype
        self.projection = projection.to(self.device, self.dtype).eval() if (use_projection and projection) else None
        self.runner = StackRunner(encoder, granularity or default_granularity(encoder))
        self.batches = [self._tokenize(self.prompts[i:i + batch_size])
                        for i in range(0, len(self.prompts), batch_size)]
        self.null_batch = self._tokenize([""]) if null_prompt else None
        self.dense = [self.features(self.runner.forward(self.identity, b.input_ids, b.attention_mask))
                      for b in self.batches]
        self.dense_null = (self.features(self.runner.forward(self.identity, self.null_batch.input_ids,
                                                             self.null_batch.attention_mask))
                           if null_prompt else None)
        self.evaluations = 0  # candidate plans scored so far (for logs and benchmarks)

    # ----------------------------------------------------------------- set-up
    def _tokenize(self, texts: Sequence[str]) -> Batch:
        # The pipelines pad to max length (PixArt-Σ 300, SD3 256, FLUX 512 tokens; SPEC §1 trap 3).
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return Batch(tok.input_ids.to(self.device), tok.attention_mask.to(self.device))

    @property
    def identity(self) -> PruningPlan:
        return PruningPlan.identity(self.runner.signature, self.runner.granularity)

    @property
    def granularity(self) -> str:
        return self.runner.granularity

    @property
    def hash(self) -> str:
        return prompt_hash(self.prompts)

    def settings(self) -> dict[str, Any]:
        """What changes the discrepancy (part of the plan cache key)."""
        return {"prompt_hash": self.hash, "num_prompts": len(self.prompts), "max_length": self.max_length,
                "metric": self.metric, "use_projection": self.use_projection, "null_prompt": self.null_prompt,
                "token_mask": self.token_mask, "dtype": str(self.dtype).replace("torch.", "")}

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def features(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """f = proj(E(c)) (or E(c) itself without projection)."""
        return self.projection(last_hidden_state) if self.projection is not None else last_hidden_state

    def distance(self, dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
        """(sum of per-element errors, number of elements) so batches average exactly."""
        dense, pruned = dense.float(), pruned.float()
        if self.metric == "mse":
            err = (dense - pruned).pow(2)  # [N, L, d]
            if self.token_mask:
                m = mask.unsqueeze(-1).to(err.dtype)
                return float((err * m).sum()), int(m.sum()) * err.shape[-1]
            return float(err.sum()), err.numel()
        # cosine distance per token (Table A13 ablation)
        err = 1 - nn.functional.cosine_similarity(dense, pruned, dim=-1)  # [N, L]
        if self.token_mask:
            m = mask.to(err.dtype)
            return float((err * m).sum()), int(m.sum())
        return float(err.sum()), err.numel()

    def _mean_distance(self, outputs: Sequence[torch.Tensor], dense: Sequence[torch.Tensor],
                       batches: Sequence[Batch]) -> float:
        total, count = 0.0, 0
        for out, ref, b in zip(outputs, dense, batches):
            s, n = self.distance(ref, out, b.attention_mask)
            total, count = total + s, count + n
        return total / max(count, 1)

    @torch.no_grad()
    def encode(self, plan: PruningPlan) -> list[torch.Tensor]:
        """Features of every calibration batch under ``plan``."""
        return [self.features(self.runner.forward(plan, b.input_ids, b.attention_mask)) for b in self.batches]

    @torch.no_grad()
    def discrepancy(self, plan: PruningPlan) -> float:
        """D(plan): distance to the dense features over the prompts, plus the same for ∅ (paper Eq. 4)."""
        self.evaluations += 1
        d = self._mean_distance(self.encode(plan), self.dense, self.batches)
        if self.null_prompt:
            null = self.features(self.runner.forward(plan, self.null_batch.input_ids, self.null_batch.attention_mask))
            d += self._mean_distance([null], [self.dense_null], [self.null_batch])
        return d
