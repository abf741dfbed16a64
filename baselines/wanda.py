"""Wanda (Sun et al., arXiv 2306.11695): unstructured pruning by |w| x ||x||, the "more advanced" LLM technique
the SD2 study (Ramesh & Zhao, arXiv 2411.15113) compares magnitude pruning against on SD2's text encoder.

Score of weight W[i, j] = |W[i, j]| * ||X_j||_2, where X_j is input feature j of that linear layer over every token
of the calibration prompts, encoded exactly as the pipeline encodes them (skrr/encoding.py: for SD2 all 77 CLIP
positions, which the U-Net's cross-attention reads). Wanda's comparison group is each output row: every row of
every prunable matrix loses the ``int(columns * sparsity)`` lowest-scoring weights, so the sparsity is the SD2
study's definition (the fraction of the pruned linear weights that is zero). The prunable weights are the same as
magnitude pruning's (``baselines.magnitude.prunable_weights``: the nn.Linear weights inside the encoder blocks).

Activation norms are taken from the dense encoder in one pass (Wanda's released code instead re-runs each block on
the already pruned outputs of the blocks before it): recorded in the plan (``meta['wanda']['norms']``, float32,
base64), so ``apply`` is a pure function of (weights, plan), like magnitude's.

The denoiser (SD2's U-Net): with ``denoiser_sparsity > 0`` the plan carries ``meta['denoiser']`` with the first
``denoiser_calib_prompts`` calibration prompts; where the pipeline is loaded, ``prune_denoiser_`` runs the real
denoising loop on them (classifier-free guidance, the cell's steps and size), accumulates ||x_j||^2 at the input of
every U-Net nn.Linear (and with ``linear_conv`` per input channel of every nn.Conv2d, over all positions) over all
steps, then prunes per output row as above. The study itself pruned the U-Net by magnitude only.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from baselines import base_meta, weight_rule_target
from baselines.magnitude import (check_denoiser, denoiser_report, denoiser_weights, prunable_weights,
                                 storage_bytes)
from skrr.interface import PruningMethod, check_sparsity, register_method
from skrr.plan import PlanError, PruningPlan
from skrr.surgery import count_params

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)


@contextmanager
def input_norms(named: list[tuple[str, nn.Parameter]], modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, accumulate sum over tokens of x_j^2 at the input of each module (float64, per input
    feature; a conv's per input channel, over all positions)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().double()
            if isinstance(module, nn.Conv2d):
                sq = x.pow(2).sum(dim=(0, 2, 3))
            else:
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            sums[name] = sums.get(name, 0) + sq
        return fn

    for name, _ in named:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()


def _modules_of(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> dict[str, nn.Module]:
    """weight name -> the module that owns it."""
    mods = dict(model.named_modules())
    return {name: mods[name[: -len(".weight")]] for name, _ in named}


def row_counts(w: torch.Tensor, sparsity: float) -> int:
    """Zeros per output row: Wanda's ``int(columns * sparsity)`` (a conv's columns are in * kh * kw)."""
    return int(w[0].numel() * sparsity)


def wanda_mask(w: torch.Tensor, norm_sq: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the weights Wanda zeroes: per output row, the lowest |w| * ||x_j|| (ties by column)."""
    norm = norm_sq.double().sqrt()
    if w.dim() == 4:  # conv: input channel j covers the kh*kw columns of that channel
        norm = norm[:, None, None].expand(w.shape[1:]).reshape(-1)
    score = w.detach().double().reshape(w.shape[0], -1).abs() * norm[None, :]
    k = row_counts(w, sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask.view(w.shape)


@torch.no_grad()
def zero_by_norms(named: list[tuple[str, nn.Parameter]], norms: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """Zero each weight's Wanda mask in place; returns zeros per weight."""
    zeros = {}
    for name, w in named:
        mask = wanda_mask(w, norms[name].to(w.device), sparsity)
        w.masked_fill_(mask, 0)
        zeros[name] = int(mask.sum())
    return zeros


def _pack(t: torch.Tensor) -> str:
    return base64.b64encode(t.float().cpu().numpy().astype("<f4").tobytes()).decode()


def _unpack(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype="<f4").copy()).double()


def _weights_hash(named: list[tuple[str, nn.Parameter]]) -> str:
    """Short hash of the prunable weights (apply refuses a plan made for other weights)."""
    h = hashlib.sha256()
    for name, w in named:
        h.update(name.encode())
        h.update(w.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encoder_norms(calib: "CalibrationSet") -> dict[str, torch.Tensor]:
    """sum of x_j^2 at every prunable linear input of the dense encoder over the calibration prompts (and the
    empty prompt when the set scores it), encoded as the pipeline encodes them."""
    named = prunable_weights(calib.encoder)
    prompts = list(calib.prompts) + ([""] if calib.null_prompt else [])
    with input_norms(named, _modules_of(calib.encoder, named)) as sums:
        for i in range(0, len(prompts), calib.batch_size):
            calib.encoding.encode(calib.encoder, calib.tokenizer, prompts[i:i + calib.batch_size])
    return sums


@register_method
class Wanda(PruningMethod):
    """Unstructured |w| x ||x|| pruning of the encoder's linear weights (per output row), on the calibration set."""

    name = "wanda"
    granularity = "unit"  # the plan is the identity plan with the rule in meta['wanda']

    def __init__(self, denoiser_sparsity: float = 0.0, denoiser_weights: str = "linear",
                 denoiser_calib_prompts: int = 8):
        self.denoiser_sparsity = check_denoiser(denoiser_sparsity, "layerwise", denoiser_weights)
        self.denoiser_weights = denoiser_weights
        if int(denoiser_calib_prompts) < 1:
            raise ValueError(f"denoiser_calib_prompts must be >= 1, got {denoiser_calib_prompts}")
        self.denoiser_calib_prompts = int(denoiser_calib_prompts)

    def search_many(self, calib: "CalibrationSet", sparsities: Any) -> dict[float, PruningPlan]:
        """One pass for the activation norms serves every sparsity."""
        norms = encoder_norms(calib)
        return {float(s): self._plan(calib, s, norms) for s in sparsities}

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        return self._plan(calib, sparsity, encoder_norms(calib))

    def _plan(self, calib: "CalibrationSet", sparsity: float, norms: dict[str, torch.Tensor]) -> PruningPlan:
        sparsity = check_sparsity(sparsity)
        named = prunable_weights(calib.encoder)
        zeros = {name: row_counts(w, sparsity) * w.shape[0] for name, w in named}
        num, prunable, total = sum(zeros.values()), sum(w.numel() for _, w in named), count_params(calib.encoder)
        rule = {"sparsity": float(sparsity), "zeros": zeros, "num_zeroed": num, "prunable_params": prunable,
                "total_params": total, "paper_sparsity": num / prunable, "nominal_sparsity": num / total,
                "weights_hash": _weights_hash(named), "norms": {n: _pack(norms[n]) for n, _ in named},
                "target": "nn.Linear weights inside the encoder blocks; per output row, lowest |w|*||x_j||"}
        meta: dict[str, Any] = {}
        if self.denoiser_sparsity:
            meta["denoiser"] = {"method": "wanda", "sparsity": self.denoiser_sparsity,
                                "weights": self.denoiser_weights,
                                "prompts": list(calib.prompts[: self.denoiser_calib_prompts])}
        log.info("wanda: %d weights zeroed (%.4f of the pruned weights, %.4f of the encoder)", num,
                 rule["paper_sparsity"], rule["nominal_sparsity"])
        plan = PruningPlan.identity(calib.runner.signature, calib.granularity, self.name)
        return plan.with_meta(**base_meta(self, calib), **meta, wanda=rule, storage=storage_bytes(calib.encoder, zeros),
                              target_sparsity=float(sparsity), realized_sparsity=rule["nominal_sparsity"],
                              removed_params=0)


def apply(encoder: nn.Module, plan: PruningPlan, inplace: bool = True) -> nn.Module:
    """The encoder with a Wanda plan's weights zeroed (the plan carries the activation norms)."""
    encoder = weight_rule_target(encoder, plan, "wanda", inplace)
    rule = plan.meta["wanda"]
    named = prunable_weights(encoder)
    if _weights_hash(named) != rule["weights_hash"]:
        raise PlanError("these weights are not the ones the Wanda plan was searched on (or are already pruned): "
                        "search again on the dense encoder")
    zero_by_norms(named, {n: _unpack(v) for n, v in rule["norms"].items()}, rule["sparsity"])
    encoder.pruning_plan = plan
    return encoder


@torch.no_grad()
def prune_denoiser_(pipe: Any, denoiser: nn.Module, setting: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    """Wanda on the denoiser: activation norms over the real denoising steps of the plan's calibration prompts
    (``call``: the pipeline call's size, steps, guidance), then per-row pruning; returns the report."""
    named = denoiser_weights(denoiser, setting["weights"])
    prompts = setting["prompts"]
    with input_norms(named, _modules_of(denoiser, named)) as sums:
        pipe(prompts, output_type="latent", generator=torch.Generator("cpu").manual_seed(0), **call)
    zeros = zero_by_norms(named, sums, setting["sparsity"])
    report = denoiser_report(denoiser, named, zeros, {k: v for k, v in setting.items() if k != "prompts"}
                             | {"calib_prompts": len(prompts)})
    log.info("denoiser wanda (%s): %d weights zeroed, %.4f of those weights, %.4f of all U-Net parameters",
             setting["weights"], report["num_zeroed"], report["paper_sparsity"], report["fraction_of_all_params"])
    return report
