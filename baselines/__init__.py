"""Baseline pruning methods on the shared interface (SPEC §4): each returns a skrr.PruningPlan.

- ``baselines.shortgpt.ShortGPT``  whole blocks, lowest Block Influence first (arXiv 2403.03853)
- ``baselines.laco.LaCo``          RDSC layer merging with a similarity threshold (arXiv 2402.11187)
- ``baselines.finercut.FinerCut``  greedy removal of attention/FFN sub-blocks (arXiv 2405.18218)
- ``baselines.magnitude.Magnitude`` unstructured |w| pruning of linear weights (arXiv 2411.15113), also SD2's U-Net
- ``baselines.wanda.Wanda``        unstructured |w| x ||x|| pruning (arXiv 2306.11695), the SD2 study's comparison

The submodules are not imported here (the experiment layer imports them all to find their registrations);
this module holds the few helpers they share and ``prune_encoder``, the one call that turns any method's plan
into an encoder. Each method registers itself (``@register_method``) under its config name. Baselines build on the pruning
library (``skrr``) only: never ``eval`` or ``skrr.experiments``.
"""
from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Iterable

from torch import nn

from skrr.plan import PlanError, PruningPlan
from skrr.surgery import apply_plan, signature

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet
    from skrr.interface import PruningMethod

__all__ = ["base_meta", "changes_encoder", "check_reuse_order", "prefix_plans", "prune_denoiser", "prune_encoder", "zeroes_weights",
           "with_reuse"]
log = logging.getLogger(__name__)


def base_meta(method: "PruningMethod", calib: "CalibrationSet") -> dict[str, Any]:
    """What every baseline plan records: the method's settings and the calibration set's."""
    return {"settings": method.settings(), "calib": calib.settings()}


def with_reuse(calib: "CalibrationSet", plan: PruningPlan, order: str = "ascending") -> PruningPlan:
    """Skrr's Re-use phase (Alg. 2) on a baseline plan (App. C.4): same sparsity, some skips re-use a unit.

    The decisions and D before/after are recorded by ``skrr.method.reuse_phase`` in ``meta['reuse']``.
    """
    from skrr.method import reuse_phase  # looked up at call time (tests substitute it)

    return reuse_phase(calib, plan, order=order)


def prefix_plans(method: "PruningMethod", calib: "CalibrationSet", order: list[int], targets: Iterable[float],
                 granularity: str, meta: dict[str, Any], reuse: bool = False,
                 reuse_order: str = "ascending") -> dict[float, PruningPlan]:
    """Serve every target from one removal order: its shortest prefix (SPEC §1), then Re-use if asked."""
    from skrr.interface import prefix_plan

    plans = {}
    for s in targets:
        plan = prefix_plan(calib.encoder, order, s, granularity, method.name, meta)
        plans[s] = with_reuse(calib, plan, reuse_order) if reuse else plan
        log.info("%s: target %.4f -> %s", method.name, s, plans[s].summary())
    return plans


def check_reuse_order(order: str) -> str:
    """Refuse a re-use order that skrr.method.reuse_phase does not know, at construction time."""
    from skrr.method import REUSE_ORDERS

    if order not in REUSE_ORDERS:
        raise ValueError(f"reuse_order must be one of {REUSE_ORDERS}, got {order!r}")
    return order


# Plans whose slots are the identity and whose rule zeroes weights (meta key -> module with ``apply``).
WEIGHT_RULES = ("magnitude", "wanda")


def zeroes_weights(plan: PruningPlan) -> bool:
    """Whether the plan carries a rule that zeroes weights inside tensors (magnitude, Wanda, or a denoiser rule),
    which needs the dense weights in memory, rather than only dropping or re-using whole units."""
    return any(k in plan.meta for k in WEIGHT_RULES) or "denoiser" in plan.meta


def changes_encoder(plan: PruningPlan) -> bool:
    """Whether ``prune_encoder`` changes anything: a non-identity plan, or a magnitude/Wanda plan (identity
    slots, zeroed weights) -- including one that prunes only the denoiser (``meta['denoiser']``)."""
    return not plan.is_identity or zeroes_weights(plan)


def weight_rule_target(encoder: nn.Module, plan: PruningPlan, key: str, inplace: bool) -> nn.Module:
    """The encoder a weight-rule plan (``meta[key]``: magnitude, Wanda) zeroes: checked against the plan, and
    the encoder itself (``inplace``: no second copy of 4.7 B weights) or a deep copy."""
    if key not in plan.meta:
        raise PlanError(f"not a {key} plan (no meta[{key!r}]); apply a skip/re-use plan with skrr.apply_plan")
    plan.validate(signature(encoder))
    return encoder if inplace else copy.deepcopy(encoder)


def prune_encoder(encoder: nn.Module, plan: PruningPlan, inplace: bool = False) -> nn.Module:
    """The pruned encoder of any method's plan: ``apply_plan`` for skip/re-use/merge plans, and for
    magnitude plans (identity slots + a |w| rule in ``meta['magnitude']``) the encoder with weights zeroed.
    """
    import importlib

    for key in WEIGHT_RULES:
        if key in plan.meta:
            return importlib.import_module(f"baselines.{key}").apply(encoder, plan, inplace=inplace)
    return apply_plan(encoder, plan, inplace=inplace)


def prune_denoiser(pipe: Any, denoiser: nn.Module, plan: PruningPlan, call: dict[str, Any]) -> dict[str, Any] | None:
    """Prune the denoiser in place by the plan's ``meta['denoiser']`` rule (SD2 study: magnitude; or Wanda on
    activations of real denoising steps, ``call`` = the pipeline call's size/steps/guidance); returns the
    report (sparsity as the study defines it and of all parameters, bytes), or None when the plan has none."""
    setting = plan.meta.get("denoiser")
    if not setting:
        return None
    if setting["method"] == "magnitude":
        from baselines.magnitude import prune_denoiser_

        return prune_denoiser_(denoiser, setting["sparsity"], setting["scope"], setting["weights"])
    if setting["method"] == "wanda":
        from baselines.wanda import prune_denoiser_ as wanda_denoiser_

        return wanda_denoiser_(pipe, denoiser, setting, call)
    raise ValueError(f"unknown denoiser pruning method {setting['method']!r} in the plan")
