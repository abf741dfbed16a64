"""LaCo (Yang et al., arXiv 2402.11187, Alg. 1) as the Skrr paper adapted it (SPEC §4): layer collapse.

Reserving-Differences-while-Seeking-Common (RDSC) merge of C blocks into block l:
theta*_l = theta_l + sum_{k=1..C-1} (theta_{l+k} - theta_l) on the attention and FFN linear weights, layer
norms kept from block l (``skrr.families.merge_units``; the formula, not the authors' notebook, which
telescopes for C > 2). A merge is accepted when the cosine similarity between the flattened final output
(``last_hidden_state``) of the merged model and of the dense model, averaged over a few prompts, exceeds T.

The sweep follows the authors' code: ``l`` indexes the *current* (already merged, shrinking) model,
0-based; it starts at ``l = min(H, num_blocks) - C`` (the top C blocks) and goes down to ``L``; after an
accepted merge ``l -= I`` and the merged model is the one later merges start from, after a rejection
``l -= 1``. With the paper's C=2, I=2, L=1, H=24 block 0 is never a merge base and, since I >= C, a merge
never takes in an already merged block: every current block is a run of consecutive original blocks and
each merge is one flat RDSC merge of original blocks, which is exactly what a plan expresses
(``Slot(l, "block", merged_from=(l, l+1, ...))``, merged-away positions ``None``). I < C would merge a
merged block again (weights theta* of theta*), which a plan cannot express, so it is refused.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from baselines import base_meta
from skrr.calib import Batch, prompt_hash
from skrr.interface import (SPARSITY_TOLERANCE, PruningMethod, SparsityError, check_sparsity, register_method,
                            removed_fraction)
from skrr.plan import PruningPlan, Slot
from skrr.surgery import StackRunner

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

Groups = list[tuple[int, ...]]  # the current model: each block is a run of original blocks (merged if > 1)


def groups_to_plan(groups: Groups, runner: StackRunner, meta: dict | None = None) -> PruningPlan:
    """The block plan of a current model: a merged block at its first original position, the rest None."""
    slots: list[Slot | None] = []
    for g in groups:
        slots.append(Slot(g[0], "block", g if len(g) > 1 else ()))
        slots.extend([None] * (len(g) - 1))
    return PruningPlan(runner.signature, "block", tuple(slots), "laco", dict(meta or {}))


def fewshot_batch(calib: "CalibrationSet", num: int) -> tuple[Batch, list[str]]:
    """The first ``num`` calibration prompts (calib's seeded sample), tokenized as calib tokenized them."""
    ids = torch.cat([b.input_ids for b in calib.batches])[:num]
    mask = torch.cat([b.attention_mask for b in calib.batches])[:num]
    return Batch(ids, mask, calib.encoding.masks_encoder), calib.prompts[:num]


@torch.no_grad()
def output_similarity(dense: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean over prompts of cos(flatten(dense output), flatten(merged output)); valid tokens only with a mask."""
    sims = []
    for n in range(dense.shape[0]):
        keep = slice(None) if mask is None else mask[n].bool()
        a, b = dense[n][keep].flatten().float(), merged[n][keep].flatten().float()
        sims.append(float(nn.functional.cosine_similarity(a, b, dim=0)))
    return sum(sims) / len(sims)


@register_method
class LaCo(PruningMethod):
    """Top-down RDSC layer merging with a similarity threshold, until the target sparsity."""

    name = "laco"
    granularity = "block"

    def __init__(self, merge_layers: int = 2, interval: int = 2, layer_low: int = 1, layer_high: int = 24,
                 threshold: float = 0.7, num_fewshot: int = 5, exclude_padding: bool = True):
        if merge_layers < 2:
            raise ValueError(f"laco.merge_layers (C) must be >= 2 (blocks per merge), got {merge_layers}")
        if interval < merge_layers:
            raise ValueError(f"laco.interval (I={interval}) < laco.merge_layers (C={merge_layers}) would merge an "
                             f"already merged block, which a plan cannot express; use I >= C (paper: C=2, I=2)")
        if layer_low < 0 or num_fewshot < 1:
            raise ValueError(f"laco needs layer_low >= 0 and num_fewshot >= 1, got {layer_low}, {num_fewshot}")
        self.merge_layers = int(merge_layers)
        self.interval = int(interval)
        self.layer_low = int(layer_low)
        self.layer_high = int(layer_high)
        self.threshold = float(threshold)
        # LaCo's code calibrates on 5 short Wikipedia sentences, one at a time (no padding): here the first 5
        # calibration prompts; with exclude_padding only their tokens count, which equals unpadded encoding.
        self.num_fewshot = int(num_fewshot)
        self.exclude_padding = bool(exclude_padding)

    @torch.no_grad()
    def sweep(self, calib: "CalibrationSet", max_sparsity: float) -> tuple[list[Groups], list[dict], dict]:
        """Run LaCo's sweep until ``max_sparsity``: (current model after each accepted merge, trials, info)."""
        encoder = calib.encoder
        batch, prompts = fewshot_batch(calib, self.num_fewshot)
        mask = batch.attention_mask if self.exclude_padding else None
        runner = StackRunner(encoder, "block")
        dense = runner.forward(PruningPlan.identity(runner.signature, "block"), batch.input_ids, batch.encoder_mask)
        groups: Groups = [(b,) for b in range(runner.signature.num_blocks)]
        snapshots, trials = [list(groups)], []
        high = min(self.layer_high, len(groups))
        l = high - self.merge_layers
        while l >= self.layer_low and removed_fraction(encoder, groups_to_plan(groups, runner)) < \
                max_sparsity - SPARSITY_TOLERANCE:
            window = groups[l:l + self.merge_layers]  # clipped at the top of the current model, as LaCo's code
            merged = tuple(b for g in window for b in g)
            candidate = groups[:l] + [merged] + groups[l + len(window):]
            # A fresh runner per candidate: a rejected merged block is not kept in memory.
            out = StackRunner(encoder, "block").forward(groups_to_plan(candidate, runner), batch.input_ids,
                                                        batch.encoder_mask)
            sim = output_similarity(dense, out, mask)
            accepted = sim > self.threshold
            trials.append({"layer": l, "blocks": list(merged), "similarity": sim, "accepted": accepted})
            log.info("laco: merge %s at current layer %d: similarity %.4f %s T=%.3f", "+".join(map(str, merged)),
                     l, sim, ">" if accepted else "<=", self.threshold)
            if accepted:
                groups = candidate
                snapshots.append(list(groups))
                l -= self.interval
            else:
                l -= 1
        info = {"fewshot_prompt_hash": prompt_hash(prompts), "num_fewshot_used": len(prompts),
                "layer_range": [self.layer_low, high]}
        return snapshots, trials, info

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The merged plan at the first point of the sweep that reaches ``sparsity``."""
        return self.search_many(calib, [sparsity])[float(sparsity)]

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One sweep up to the largest target; each target is served by the shortest prefix of its merges."""
        targets = [check_sparsity(s) for s in sparsities]
        snapshots, trials, info = self.sweep(calib, max(targets, default=0.0))
        runner = StackRunner(calib.encoder, "block")
        plans_k = [groups_to_plan(g, runner) for g in snapshots]
        realized = [removed_fraction(calib.encoder, p) for p in plans_k]
        merges = [[list(g) for g in snap if len(g) > 1] for snap in snapshots]
        meta = {**base_meta(self, calib), **info, "trials": trials}
        plans = {}
        for s in targets:
            k = next((k for k, r in enumerate(realized) if r >= s - SPARSITY_TOLERANCE), None)
            if k is None:
                rejected = [t["similarity"] for t in trials if not t["accepted"]]
                best = f"; the best rejected merge scored {max(rejected):.4f}" if rejected else ""
                raise SparsityError(
                    f"laco: the sweep over blocks [{self.layer_low}, {info['layer_range'][1]}) accepted "
                    f"{len(snapshots) - 1} merges ({100 * realized[-1]:.2f} %) at threshold T={self.threshold}, "
                    f"short of the target {100 * s:.2f} %{best}; lower laco.threshold, widen "
                    f"laco.layer_low/layer_high, or raise laco.merge_layers")
            plans[s] = plans_k[k].with_meta(**meta, merges=merges[k], prefix=k, target_sparsity=s,
                                            realized_sparsity=realized[k])
            log.info("laco: target %.4f -> %s", s, plans[s].summary())
        return plans
