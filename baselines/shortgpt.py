"""ShortGPT (Men et al., arXiv 2403.03853) as the Skrr paper adapted it (SPEC §4): whole blocks, one shot.

Block Influence BI_i = 1 - E_{x,t}[cos(x_{i,t}, x_{i+1,t})] (ShortGPT Eq. 1) between the input and the
output of block i, on the raw T5 hidden states (before the final LayerNorm, SPEC §1 trap 1; no caption
projection, no null prompt). The blocks with the lowest BI go first; one ranking serves every sparsity.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from baselines import base_meta, check_reuse_order, prefix_plans
from skrr.interface import PruningMethod, check_sparsity, describe_order, register_method
from skrr.plan import PruningPlan
from skrr.surgery import StackRunner

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(calib: "CalibrationSet", exclude_padding: bool = True) -> list[float]:
    """BI of every block (1 - mean token cosine between block input and output), over the calibration prompts."""
    runner = StackRunner(calib.encoder, "block")  # one position per block, whatever calib's granularity
    plan = PruningPlan.identity(runner.signature, "block")
    n = plan.num_positions
    cos_sum = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    for batch in calib.batches:
        h, ctx = runner.prepare(batch.input_ids, batch.encoder_mask)
        # ShortGPT averages over the tokens of the text; padding is not text (and PixArt-Σ masks it out of
        # cross-attention), so by default it is left out: otherwise BI would be weighted by prompt length.
        keep = batch.attention_mask.bool() if exclude_padding else torch.ones_like(batch.attention_mask).bool()
        for b in range(n):
            out = runner.run(plan, h, ctx, b, b + 1)
            cos = nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)  # [N, L]
            cos_sum[b] += cos[keep].double().sum().cpu()
            h = out
        tokens += int(keep.sum())
    return [float(1.0 - c / max(tokens, 1)) for c in cos_sum]


@register_method
class ShortGPT(PruningMethod):
    """Remove the whole blocks with the lowest Block Influence (one shot); optional Skrr Re-use (App. C.4)."""

    name = "shortgpt"
    granularity = "block"

    def __init__(self, exclude_padding: bool = True, reuse: bool = False, reuse_order: str = "ascending"):
        self.exclude_padding = bool(exclude_padding)
        self.reuse = bool(reuse)
        self.reuse_order = check_reuse_order(reuse_order)

    def ranking(self, calib: "CalibrationSet") -> tuple[list[int], list[float]]:
        """(blocks by ascending BI, ties to the lower index; BI per block)."""
        bi = block_influence(calib, self.exclude_padding)
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
        log.info("shortgpt: BI order %s", describe_order(order, "block"))
        return order, bi

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The plan removing the fewest lowest-BI blocks that reach ``sparsity``."""
        return self.search_many(calib, [sparsity])[float(sparsity)]

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One BI ranking, then the shortest prefix reaching each sparsity (SPEC §1)."""
        targets = [check_sparsity(s) for s in sparsities]
        order, bi = self.ranking(calib)
        meta = {**base_meta(self, calib), "block_influence": bi}
        return prefix_plans(self, calib, order, targets, "block", meta, self.reuse, self.reuse_order)
