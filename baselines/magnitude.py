"""Unstructured magnitude pruning of the text encoder (Ramesh & Zhao, arXiv 2411.15113; SPEC §4).

Zero the smallest |w| of the encoder's linear weights (every ``nn.Linear.weight`` inside the blocks: T5
q, k, v, o, wi_0, wi_1, wo), ``scope=layerwise`` (the same fraction of every matrix) or ``global`` (one
threshold over all of them). Biases, layer norms, the token embedding and T5's position bias are kept, as
the seed paper prunes linear layers. The number of zeros is ``round(sparsity * all encoder parameters)``
(SPEC §1: embedding in the denominator), exact to one weight: ties at the threshold are broken by matrix
order, then flat index, so the mask is a pure function of (weights, sparsity, scope).

``sparsity_of`` picks the denominator: ``encoder`` (SPEC §1: all encoder parameters, embedding included; the
default) or ``prunable`` (the SD2 study's definition: the fraction of the pruned linear weights that is zero, as its
released code's ``check_sparsity`` counts; the study prunes every such matrix to that fraction). Either way the plan
records both (``paper_sparsity``, ``nominal_sparsity`` = of all encoder parameters).

The denoiser (SD2's U-Net) is pruned the same way when ``denoiser_sparsity > 0``: ``denoiser_weights=linear``
zeroes the smallest |w| of every ``nn.Linear`` weight of the U-Net (what the study's code prunes), ``linear_conv``
adds every ``nn.Conv2d`` weight; layer-wise or global, the sparsity as the study defines it (of those weights). The
rule is recorded in ``meta['denoiser']`` and applied where the pipeline is loaded (``prune_denoiser_``), which also
reports the fraction of all U-Net parameters and the sparse-storage bytes.

This is not a skip plan. The plan is the identity plan with the rule in ``meta['magnitude']``;
``apply(encoder, plan)`` zeroes the weights (``baselines.prune_encoder`` dispatches to it). Zeros save no
memory in dense storage: ``meta['storage']`` gives the real bytes, dense and as sparse CSR/COO tensors
(``save_sparse``), and says plainly whether sparse storage is smaller (it is not at moderate sparsity).
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from baselines import base_meta, weight_rule_target
from skrr.families import family_of
from skrr.interface import PruningMethod, SparsityError, check_sparsity, register_method
from skrr.io import atomic_write_bytes
from skrr.plan import PlanError, PruningPlan
from skrr.surgery import count_params

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

SCOPES = ("layerwise", "global")
SPARSITY_OF = ("encoder", "prunable")  # denominator: all encoder parameters (SPEC §1) | the pruned weights (2411.15113)
DENOISER_WEIGHTS = ("linear", "linear_conv")


def prunable_weights(encoder: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every nn.Linear inside the encoder's blocks, in module order."""
    blocks = family_of(encoder).blocks(encoder)
    block_ids = {id(m) for b in blocks for m in b.modules() if isinstance(m, nn.Linear)}
    return [(f"{name}.weight", m.weight) for name, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and id(m) in block_ids]


def _abs_bits(w: torch.Tensor) -> torch.Tensor:
    """|w| as int32 bit patterns of float32: same order as the values, exact for fp32/bf16/fp16 weights."""
    return w.detach().abs().float().flatten().view(torch.int32)


def _global_counts(weights: list[torch.Tensor], num: int) -> tuple[list[int], float]:
    """Zeros per matrix for one global threshold: the ``num`` smallest |w| overall, ties in matrix order."""
    lo, hi = 0, 0x7F800000  # bit patterns of 0.0 and +inf; bisect for the num-th smallest |w|
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int((_abs_bits(w) <= mid).sum()) for w in weights) >= num:
            hi = mid
        else:
            lo = mid + 1
    below = [int((_abs_bits(w) < lo).sum()) for w in weights]
    ties = [int((_abs_bits(w) == lo).sum()) for w in weights]
    left, counts = num - sum(below), []
    for b, t in zip(below, ties):
        take = min(t, left)
        counts.append(b + take)
        left -= take
    threshold = float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))
    return counts, threshold


def _layerwise_counts(sizes: list[int], num: int) -> list[int]:
    """Zeros per matrix for one shared fraction num / sum(sizes), the remainder to the largest fractions."""
    total = sum(sizes)
    counts = [num * n // total for n in sizes]
    rest = num - sum(counts)
    by_fraction = sorted(range(len(sizes)), key=lambda i: (-(num * sizes[i] % total), i))
    for i in by_fraction[:rest]:
        counts[i] += 1
    return counts


def smallest_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest |w| of a tensor (ties by flat index)."""
    bits = _abs_bits(w)
    mask = torch.zeros_like(bits, dtype=torch.bool)
    if k > 0:
        t = torch.kthvalue(bits, k).values
        mask = bits < t
        tied = (bits == t).nonzero().flatten()[: k - int(mask.sum())]
        mask[tied] = True
    return mask.view(w.shape)


def magnitude_rule(encoder: nn.Module, sparsity: float, scope: str, sparsity_of: str = "encoder",
                   named: list[tuple[str, nn.Parameter]] | None = None) -> dict[str, Any]:
    """The zeros per linear weight that put ``sparsity`` of all encoder parameters (``sparsity_of=encoder``) or of
    the prunable weights (``prunable``, the SD2 study's definition) at zero; no change made. ``named`` overrides
    which weights are prunable (the denoiser's)."""
    if scope not in SCOPES:
        raise ValueError(f"magnitude.scope must be one of {SCOPES}, got {scope!r}")
    if sparsity_of not in SPARSITY_OF:
        raise ValueError(f"magnitude.sparsity_of must be one of {SPARSITY_OF}, got {sparsity_of!r}")
    sparsity = check_sparsity(sparsity)
    named = prunable_weights(encoder) if named is None else named
    total = count_params(encoder)
    prunable = sum(w.numel() for _, w in named)
    num = round(sparsity * (total if sparsity_of == "encoder" else prunable))
    if num > prunable:
        raise SparsityError(f"magnitude: {100 * sparsity:.2f} % of the encoder is {num} weights but its linear "
                            f"weights are only {prunable} ({100 * prunable / total:.2f} %); the embedding, norms "
                            f"and biases are not pruned, so lower the sparsity")
    weights = [w for _, w in named]
    threshold = None
    if scope == "global":
        counts, threshold = _global_counts(weights, num) if num else ([0] * len(weights), 0.0)
    else:
        counts = _layerwise_counts([w.numel() for w in weights], num)
    return {"scope": scope, "sparsity_of": sparsity_of, "num_zeroed": num, "prunable_params": prunable,
            "total_params": total, "nominal_sparsity": num / total, "paper_sparsity": num / prunable if prunable else 0.0,
            "threshold": threshold,
            "zeros": {name: k for (name, _), k in zip(named, counts)},
            "target": "nn.Linear weights inside the encoder blocks; ties by matrix order, then flat index"}


def storage_bytes(encoder: nn.Module, zeros: dict[str, int] | None = None,
                  named: list[tuple[str, nn.Parameter]] | None = None) -> dict[str, Any]:
    """Real bytes of the encoder's parameters: dense, and with the pruned matrices as CSR / COO tensors.

    ``zeros`` maps weight names to their number of zeros (default: count them in the weights).
    CSR = values + int64 column indices per non-zero + int64 row pointers; COO = values + 2 int64 indices.
    """
    named = dict(prunable_weights(encoder) if named is None else named)
    params = {id(p): p for p in encoder.parameters()}.values()
    dense = sum(p.numel() * p.element_size() for p in params)
    csr = coo = csr32 = dense
    for name, w in named.items():
        nnz = w.numel() - (zeros[name] if zeros is not None else int((w == 0).sum()))
        size, rows = w.element_size(), w.shape[0]  # a conv weight is stored as [out, in*kh*kw]
        csr += nnz * (size + 8) + (rows + 1) * 8 - w.numel() * size
        csr32 += nnz * (size + 4) + (rows + 1) * 4 - w.numel() * size
        coo += nnz * (size + 16) - w.numel() * size
    return {"dense_bytes": dense, "csr_bytes": csr, "csr_int32_bytes": csr32, "coo_bytes": coo,
            "sparse_saves_memory": csr < dense,
            "note": ("dense storage keeps every zero: no memory is saved unless weights are stored sparse; "
                     + ("CSR storage is smaller" if csr < dense else
                        f"CSR (int64 indices) would be {csr / dense:.2f}x the dense size, larger, at this sparsity"))}


@torch.no_grad()
def prune_(encoder: nn.Module, sparsity: float, scope: str = "layerwise") -> dict[str, Any]:
    """Zero the smallest |w| in place at ``sparsity`` of all encoder parameters; returns the rule applied."""
    rule = magnitude_rule(encoder, sparsity, scope)
    _zero_(encoder, rule)
    return rule


@torch.no_grad()
def _zero_(encoder: nn.Module, rule: dict[str, Any], named: list[tuple[str, nn.Parameter]] | None = None) -> None:
    for name, w in (prunable_weights(encoder) if named is None else named):
        w.masked_fill_(smallest_mask(w, rule["zeros"][name]), 0)


# ------------------------------------------------------------------------------------------------ denoiser
def denoiser_weights(denoiser: nn.Module, which: str = "linear") -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every nn.Linear (and with ``linear_conv`` every nn.Conv2d) of a denoiser, module order."""
    if which not in DENOISER_WEIGHTS:
        raise ValueError(f"denoiser_weights must be one of {DENOISER_WEIGHTS}, got {which!r}")
    kinds = (nn.Linear, nn.Conv2d) if which == "linear_conv" else (nn.Linear,)
    return [(f"{name}.weight", m.weight) for name, m in denoiser.named_modules() if isinstance(m, kinds)]


def denoiser_report(denoiser: nn.Module, named: list[tuple[str, nn.Parameter]], zeros: dict[str, int],
                    setting: dict[str, Any]) -> dict[str, Any]:
    """What pruning the denoiser did: zeros, sparsity as the SD2 study defines it (of the pruned weights) and
    as a fraction of all denoiser parameters, and the real bytes dense / sparse."""
    num = sum(zeros.values())
    prunable = sum(w.numel() for _, w in named)
    total = count_params(denoiser)
    return {**setting, "num_zeroed": num, "prunable_params": prunable, "total_params": total,
            "paper_sparsity": num / prunable if prunable else 0.0, "fraction_of_all_params": num / total,
            "storage": storage_bytes(denoiser, zeros, named)}


@torch.no_grad()
def prune_denoiser_(denoiser: nn.Module, sparsity: float, scope: str = "layerwise",
                    which: str = "linear") -> dict[str, Any]:
    """Zero the smallest |w| of the denoiser's linear (+conv) weights in place: ``sparsity`` of those weights
    (the SD2 study's definition), layer-wise or global; returns the report (``denoiser_report``)."""
    named = denoiser_weights(denoiser, which)
    rule = magnitude_rule(denoiser, sparsity, scope, "prunable", named=named)
    _zero_(denoiser, rule, named)
    setting = {"method": "magnitude", "sparsity": float(sparsity), "scope": scope, "weights": which,
               "threshold": rule["threshold"]}
    report = denoiser_report(denoiser, named, rule["zeros"], setting)
    log.info("denoiser magnitude %s (%s): %d weights zeroed, %.4f of those weights, %.4f of all U-Net parameters",
             scope, which, report["num_zeroed"], report["paper_sparsity"], report["fraction_of_all_params"])
    return report


def apply(encoder: nn.Module, plan: PruningPlan, inplace: bool = True) -> nn.Module:
    """The encoder with a magnitude plan's weights zeroed (in place by default: no second copy of 4.7 B weights)."""
    encoder = weight_rule_target(encoder, plan, "magnitude", inplace)
    want = plan.meta["magnitude"]
    rule = magnitude_rule(encoder, want["nominal_sparsity_target"], want["scope"], want.get("sparsity_of", "encoder"))
    if rule["zeros"] != want["zeros"] or rule["threshold"] != want["threshold"]:
        raise PlanError("these weights give another magnitude mask than the plan recorded; the plan was made "
                        "for other weights (or already pruned ones): search again on the dense encoder")
    _zero_(encoder, rule)
    encoder.pruning_plan = plan
    return encoder


def sparse_state_dict(encoder: nn.Module, layout: str = "csr",
                      index_dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
    """State dict with the linear block weights as sparse tensors (``csr`` or ``coo``), the rest dense."""
    sparse_names = {name for name, _ in prunable_weights(encoder)}
    out = {}
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every call
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
        for name, t in encoder.state_dict().items():
            if name in sparse_names:
                if layout == "csr":
                    s = t.to_sparse_csr()
                    t = torch.sparse_csr_tensor(s.crow_indices().to(index_dtype), s.col_indices().to(index_dtype),
                                                s.values(), s.shape)
                elif layout == "coo":
                    t = t.to_sparse_coo().coalesce()
                else:
                    raise ValueError(f"sparse layout must be 'csr' or 'coo', got {layout!r}")
            out[name] = t
    return out


def save_sparse(encoder: nn.Module, path: str | Path, layout: str = "csr",
                index_dtype: torch.dtype = torch.int64) -> int:
    """Write the encoder with sparse linear weights (torch.save, atomic); returns the bytes written."""
    buf = io.BytesIO()
    torch.save(sparse_state_dict(encoder, layout, index_dtype), buf)
    data = buf.getvalue()
    atomic_write_bytes(Path(path), data)
    dense = storage_bytes(encoder)["dense_bytes"]
    log.info("magnitude: wrote %s (%d bytes; dense parameters take %d bytes%s)", path, len(data), dense,
             "" if len(data) < dense else " -- sparse storage is LARGER than dense here")
    return len(data)


def load_sparse(encoder: nn.Module, path: str | Path) -> nn.Module:
    """Load weights written by ``save_sparse`` into a dense encoder of the same architecture."""
    with warnings.catch_warnings():  # weights_only=True validates sparse tensors (wanted) and says so
        warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    encoder.load_state_dict({k: (v.to_dense() if v.layout != torch.strided else v) for k, v in state.items()})
    return encoder


def check_denoiser(sparsity: float, scope: str, weights: str) -> float:
    """Refuse a denoiser setting that cannot be applied, at construction time (one line naming the key)."""
    if scope not in SCOPES:
        raise ValueError(f"denoiser_scope must be one of {SCOPES}, got {scope!r}")
    if weights not in DENOISER_WEIGHTS:
        raise ValueError(f"denoiser_weights must be one of {DENOISER_WEIGHTS}, got {weights!r}")
    try:
        return check_sparsity(sparsity)
    except SparsityError as err:
        raise ValueError(f"denoiser_sparsity: {err}") from err


@register_method
class Magnitude(PruningMethod):
    """Unstructured |w| pruning of the encoder's linear weights; the plan carries the rule, not skips."""

    name = "magnitude"
    granularity = "unit"  # the plan is the identity plan of the calibration set's granularity
    needs_calibration = False  # the rule reads weights only

    def __init__(self, scope: str = "layerwise", sparsity_of: str = "encoder", denoiser_sparsity: float = 0.0,
                 denoiser_scope: str = "layerwise", denoiser_weights: str = "linear"):
        if scope not in SCOPES:
            raise ValueError(f"magnitude.scope must be one of {SCOPES}, got {scope!r}")
        if sparsity_of not in SPARSITY_OF:
            raise ValueError(f"magnitude.sparsity_of must be one of {SPARSITY_OF}, got {sparsity_of!r}")
        self.scope, self.sparsity_of = scope, sparsity_of
        self.denoiser_sparsity = check_denoiser(denoiser_sparsity, denoiser_scope, denoiser_weights)
        self.denoiser_scope, self.denoiser_weights = denoiser_scope, denoiser_weights

    def denoiser_meta(self) -> dict[str, Any]:
        """The denoiser rule the plan carries (applied where the pipeline is loaded), or nothing."""
        if not self.denoiser_sparsity:
            return {}
        return {"denoiser": {"method": "magnitude", "sparsity": self.denoiser_sparsity, "scope": self.denoiser_scope,
                             "weights": self.denoiser_weights}}

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """Identity plan + the |w| rule at ``sparsity`` (the calibration prompts are not used)."""
        rule = magnitude_rule(calib.encoder, sparsity, self.scope, self.sparsity_of)
        rule["nominal_sparsity_target"] = float(sparsity)
        storage = storage_bytes(calib.encoder, rule["zeros"])
        log.info("magnitude %s: %d weights zeroed (%.4f of the encoder); dense %d bytes, CSR %d bytes (%s)",
                 self.scope, rule["num_zeroed"], rule["nominal_sparsity"], storage["dense_bytes"],
                 storage["csr_bytes"], "smaller" if storage["sparse_saves_memory"] else "LARGER")
        plan = PruningPlan.identity(calib.runner.signature, calib.granularity, self.name)
        return plan.with_meta(**base_meta(self, calib), **self.denoiser_meta(), magnitude=rule, storage=storage,
                                        target_sparsity=float(sparsity),
                                        realized_sparsity=rule["nominal_sparsity"], removed_params=0)

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One rule per sparsity (each a pure function of the weights)."""
        return {float(s): self.search(calib, s) for s in sparsities}
