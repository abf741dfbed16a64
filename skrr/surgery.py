"""Apply a PruningPlan to a text encoder: a physically smaller drop-in encoder, and a copy-free fast path.

``apply_plan`` returns an encoder of the original class whose block list holds only what the plan runs:
dropped weights are no longer referenced (delete the dense encoder and they are freed), a re-used unit is
the very same module (same tensors), and the forward signature and outputs are the original class's.
``StackRunner`` runs the original stack under any plan without building a model; search methods score
candidates with it, and it gives the same outputs as ``apply_plan`` (tests/test_surgery.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from skrr.families import Family, StackContext, UnitSequence, family_of, merge_units
from skrr.plan import EncoderSignature, PlanError, PruningPlan, Slot, part_of


@dataclass(frozen=True)
class Unit:
    """One prunable unit: position ``index`` (2b attn, 2b+1 ffn; or block b), its kind and parameter count."""

    index: int
    kind: str
    block: int
    params: int


def count_params(module: nn.Module | Iterable[nn.Parameter]) -> int:
    """Number of parameters, counting a tensor shared by several modules (tied, re-used) once."""
    params = module.parameters() if isinstance(module, nn.Module) else module
    seen: set = set()
    total = 0
    for p in params:
        # Tied weights can be distinct Parameter objects over one storage: key on the storage when it exists.
        # Quantized weights (torchao tensor subclasses) have no storage of their own: key on the object.
        key = id(p) if p.device.type == "meta" or hasattr(p, "__tensor_flatten__") else (p.untyped_storage().data_ptr(), p.storage_offset(),
                                                      tuple(p.shape), tuple(p.stride()))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def signature(encoder: nn.Module) -> EncoderSignature:
    """What identifies an encoder for plan validation: hub id or path, revision, family, architecture."""
    fam = family_of(encoder)
    cfg = encoder.config
    return EncoderSignature(
        model_id=str(getattr(cfg, "_name_or_path", "") or ""),
        revision=getattr(cfg, "_commit_hash", None),
        family=fam.name,
        arch=fam.arch(cfg),
        num_blocks=len(fam.blocks(encoder)),
    )


def default_granularity(encoder: nn.Module) -> str:
    """The finest exact granularity of an encoder: sub-block units for pre-LN T5/CLIP, blocks for BERT."""
    return family_of(encoder).granularities[0]


def identity_plan(encoder: nn.Module, granularity: str | None = None) -> PruningPlan:
    """The dense plan of an encoder."""
    return PruningPlan.identity(signature(encoder), granularity or default_granularity(encoder))


def units(encoder: nn.Module, granularity: str | None = None) -> list[Unit]:
    """The prunable units of an encoder with kind (attn/ffn/block), index and parameter count (SPEC §1)."""
    fam = family_of(encoder)
    granularity = granularity or default_granularity(encoder)
    shared = count_params(fam.shared_params(encoder))
    out = []
    for i, mod in enumerate(fam.unit_modules(encoder, granularity)):
        n = count_params(mod)
        if i == 0 and shared:
            n -= shared  # T5's relative position bias stays with every pruned encoder (SPEC §1 table)
        kind = part_of(i, granularity)
        out.append(Unit(i, kind, i // 2 if granularity == "unit" else i, n))
    return out


def removed_params(encoder: nn.Module, plan: PruningPlan) -> int:
    """Parameters the plan drops: the units that no position runs any more (re-use and merges add none)."""
    sizes = units(encoder, plan.granularity)
    return sum(sizes[i].params for i in plan.dropped)


def removed_fraction(encoder: nn.Module, plan: PruningPlan) -> float:
    """Realized sparsity of a plan (SPEC §1), without re-validating it."""
    return removed_params(encoder, plan) / count_params(encoder)


def realized_sparsity(encoder: nn.Module, plan: PruningPlan) -> float:
    """Removed parameters / all parameters of the dense encoder, embedding included (SPEC §1)."""
    plan.validate(signature(encoder))
    return removed_fraction(encoder, plan)


class StackRunner:
    """Runs the original encoder's stack under any plan, with no model copy: the fast path for search.

    ``prepare`` embeds once; ``run`` executes positions ``[start, stop)`` of a plan, so a caller may cache the
    hidden state of a shared prefix; ``finish`` applies the final norm. Merged (LaCo) blocks are built on
    first use and cached.
    """

    def __init__(self, encoder: nn.Module, granularity: str | None = None):
        self.encoder = encoder
        self.family: Family = family_of(encoder)
        self.granularity = granularity or default_granularity(encoder)
        self.units = self.family.unit_modules(encoder, self.granularity)
        self.signature = signature(encoder)
        self._merged: dict[tuple[int, ...], nn.Module] = {}

    def module_for(self, slot: Slot | None) -> nn.Module | None:
        """The module that runs a slot (None for a skipped position)."""
        if slot is None:
            return None
        if slot.merged_from:
            key = slot.merged_from
            if key not in self._merged:
                self._merged[key] = build_merged_block(self.family, self.encoder, key)
            return self._merged[key]
        return self.units[slot.source]

    def check(self, plan: PruningPlan) -> None:
        """Refuse a plan of another encoder or granularity."""
        plan.validate(signature(self.encoder))
        if plan.granularity != self.granularity:
            raise PlanError(f"runner works on {self.granularity}s but the plan is made of {plan.granularity}s")

    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, StackContext]:
        """Embeddings and shared context, as the encoder's own forward computes them."""
        return self.family.prepare(self.encoder, input_ids, attention_mask)

    @torch.no_grad()
    def run(self, plan: PruningPlan, h: torch.Tensor, ctx: StackContext, start: int = 0,
            stop: int | None = None) -> torch.Tensor:
        """Hidden state after positions ``[start, stop)`` of ``plan``, starting from ``h``."""
        for pos in range(start, plan.num_positions if stop is None else stop):
            module = self.module_for(plan.slots[pos])
            if module is not None:
                h = module(h, ctx)
        return h

    @torch.no_grad()
    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """From the last position's output to ``last_hidden_state``."""
        return self.family.finish(self.encoder, h)

    @torch.no_grad()
    def forward(self, plan: PruningPlan, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``last_hidden_state`` of the encoder pruned by ``plan``."""
        self.check(plan)
        h, ctx = self.prepare(input_ids, attention_mask)
        return self.finish(self.run(plan, h, ctx))


def build_merged_block(family: Family, encoder: nn.Module, merged_from: tuple[int, ...]) -> nn.Module:
    """LaCo's merged block (new weights, SPEC §4) for blocks ``merged_from = (l, l+1, ...)``."""
    blocks = family.blocks(encoder)
    units_l = family.block_units(blocks[merged_from[0]])
    others = [family.block_units(blocks[k]) for k in merged_from[1:]]
    merged = merge_units(units_l, others)
    return merged[0] if len(merged) == 1 else UnitSequence(merged)


def _block_positions(plan: PruningPlan, runner: StackRunner) -> list[list[nn.Module]]:
    """For each original block: the modules that run in its place, in order."""
    n_blocks = plan.encoder.num_blocks
    per_block: list[list[nn.Module]] = [[] for _ in range(n_blocks)]
    for pos, slot in enumerate(plan.slots):
        module = runner.module_for(slot)
        if module is None:
            continue
        block = pos // 2 if plan.granularity == "unit" else pos
        if isinstance(module, UnitSequence) and not slot.merged_from:
            per_block[block].extend(module.units)  # a kept whole block: its attn and ffn units
        else:
            per_block[block].append(module)
    return per_block


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter, with its own child table (so swaps don't leak back)."""
    new = copy.copy(module)
    new._modules = module._modules.copy()
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    return new


def apply_plan(encoder: nn.Module, plan: PruningPlan, inplace: bool = False) -> nn.Module:
    """A physically smaller encoder running ``plan``; same class, forward signature, outputs and config.

    With ``inplace=False`` (default) the dense encoder is left intact and the result shares its kept weights:
    ``encoder = apply_plan(encoder, plan)`` drops the last reference to the removed weights so their
    memory is freed. With ``inplace=True`` the encoder itself is rewired.
    """
    if getattr(encoder, "pruning_plan", None) is not None:
        raise PlanError("this encoder is already pruned; apply plans to the dense encoder")
    runner = StackRunner(encoder, plan.granularity)
    runner.check(plan)
    fam = runner.family
    sparsity = removed_fraction(encoder, plan)
    new_blocks = nn.ModuleList(fam.slot_block(encoder, mods, b)
                               for b, mods in enumerate(_block_positions(plan, runner)))
    if inplace:
        target = encoder
        parent = target
        for name in fam.stack_path_of(encoder)[:-1]:
            parent = getattr(parent, name)
    else:
        target = _shallow_copy(encoder)
        parent = target
        for name in fam.stack_path_of(encoder)[:-1]:
            child = _shallow_copy(getattr(parent, name))
            setattr(parent, name, child)
            parent = child
    setattr(parent, fam.stack_path_of(encoder)[-1], new_blocks)
    # transformers installs its output-recording hooks once per model, and per inner model (CLIPTextModel inside
    # CLIPTextModelWithProjection): the new blocks need their own, or hidden_states (SD3's [-2]) is empty.
    node = target
    for name in (None, *fam.stack_path_of(encoder)[:-1]):
        node = node if name is None else getattr(node, name)
        node.__dict__.pop("_output_capturing_hooks_installed", None)
    target.__dict__.pop("_skrr_relative_bias", None)
    target.pruning_plan = plan.with_meta(realized_sparsity=sparsity)
    return target
