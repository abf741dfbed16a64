"""FinerCut (Zhang et al., arXiv 2405.18218) as the Skrr paper adapted it (SPEC §4): greedy over sub-blocks.

At each step remove the attention or FFN sub-block whose removal, together with every earlier removal,
changes the encoder output least. FinerCut's own distance (JS divergence of LM logits) has no encoder
counterpart; the Skrr paper used the MSE of the raw encoder output (``last_hidden_state``, no caption
projection, no null prompt); ``metric=cosine`` is the Table A14 variant. One greedy run gives a removal
order whose prefixes serve every sparsity of a sweep.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from baselines import base_meta, check_reuse_order, prefix_plans
from skrr.interface import (SPARSITY_TOLERANCE, PruningMethod, check_sparsity, describe_order, prefix_length,
                            register_method)
from skrr.plan import PruningPlan
from skrr.surgery import count_params, units

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

METRICS = ("mse", "cosine")


def output_distance(dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor | None,
                    metric: str) -> tuple[float, int]:
    """(sum of per-element squared errors or per-token cosine distances, count) so batches average exactly."""
    dense, pruned = dense.float(), pruned.float()
    if metric == "mse":
        err = (dense - pruned).pow(2)  # [N, L, d]
        if mask is not None:
            m = mask.unsqueeze(-1).to(err.dtype)
            return float((err * m).sum()), int(m.sum()) * err.shape[-1]
        return float(err.sum()), err.numel()
    err = 1 - nn.functional.cosine_similarity(dense, pruned, dim=-1)  # [N, L]
    if mask is not None:
        m = mask.to(err.dtype)
        return float((err * m).sum()), int(m.sum())
    return float(err.sum()), err.numel()


@register_method
class FinerCut(PruningMethod):
    """Iterative greedy removal of attention/FFN sub-blocks by output distance; optional Skrr Re-use."""

    name = "finercut"
    granularity = "unit"

    def __init__(self, metric: str = "mse", num_steps: int | None = None, reuse: bool = False,
                 reuse_order: str = "ascending"):
        if metric not in METRICS:
            raise ValueError(f"finercut.metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.num_steps = None if num_steps is None else int(num_steps)
        self.reuse = bool(reuse)
        self.reuse_order = check_reuse_order(reuse_order)

    @torch.no_grad()
    def greedy_order(self, calib: "CalibrationSet", max_sparsity: float) -> tuple[list[int], list[float]]:
        """Greedy removal order (and the distance after each step) until ``max_sparsity`` or ``num_steps``."""
        runner = calib.runner
        if runner.granularity != "unit":
            raise ValueError(f"finercut removes sub-blocks but the calibration set runs {runner.granularity}s "
                             f"(a post-LN encoder has no exact sub-block removal); use shortgpt or laco")
        n = len(runner.units)
        sizes = units(calib.encoder, "unit")
        total = count_params(calib.encoder)
        steps = n if self.num_steps is None else min(self.num_steps, n)
        if self.num_steps is None:
            prefix_length(calib.encoder, list(range(n)), max_sparsity, "unit")  # fail now if out of reach
        mask_of = (lambda b: b.attention_mask) if calib.token_mask else (lambda b: None)
        # The dense raw output is cached once (FinerCut's reference), not the projected features of calib.
        dense = [runner.forward(calib.identity, b.input_ids, b.encoder_mask) for b in calib.batches]
        plan, order, scores, removed = calib.identity, [], [], 0
        while len(order) < steps:
            if self.num_steps is None and removed / total >= max_sparsity - SPARSITY_TOLERANCE:
                break
            sums, counts = [0.0] * n, [0] * n
            for batch, ref in zip(calib.batches, dense):
                h, ctx = runner.prepare(batch.input_ids, batch.encoder_mask)
                # Walk the stack once: ``h`` is the state before position u under the current plan, which every
                # candidate that adds u shares (exact, it is the same computation), so each candidate runs only
                # the positions after u.
                for u in range(n):
                    if plan.slots[u] is not None:
                        out = runner.finish(runner.run(plan, h, ctx, u + 1, n))
                        s, c = output_distance(ref, out, mask_of(batch), self.metric)
                        sums[u], counts[u] = sums[u] + s, counts[u] + c
                    h = runner.run(plan, h, ctx, u, u + 1)
            candidates = [u for u in range(n) if plan.slots[u] is not None]
            best = min(candidates, key=lambda u: (sums[u] / max(counts[u], 1), u))  # ties: lower index
            plan = plan.with_slots({best: None})
            order.append(best)
            scores.append(sums[best] / max(counts[best], 1))
            removed += sizes[best].params
            log.info("finercut step %d: remove %s (%s %.6g), sparsity %.4f", len(order),
                     describe_order([best], "unit"), self.metric, scores[-1], removed / total)
        return order, scores

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The plan removing the shortest greedy prefix that reaches ``sparsity``."""
        return self.search_many(calib, [sparsity])[float(sparsity)]

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One greedy run up to the largest target, then the shortest prefix for each sparsity (SPEC §1)."""
        targets = [check_sparsity(s) for s in sparsities]
        order, scores = self.greedy_order(calib, max(targets, default=0.0))
        meta = {**base_meta(self, calib), "step_distance": scores}
        return prefix_plans(self, calib, order, targets, "unit", meta, self.reuse, self.reuse_order)
