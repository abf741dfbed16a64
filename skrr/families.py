"""Encoder families: where the prunable units of T5, CLIP-text and BERT live and how one unit runs.

A *unit* module runs one residual branch, residual add included: ``h -> h + branch(LN(h))`` for the
pre-LN T5 and CLIP, so skipping it is exactly the identity (SPEC §1). BERT is post-LN
(``LN(h + branch(h))``): removing only a branch would still apply the LayerNorm, so BERT is pruned in
whole blocks only. Unit modules *reference* the original sub-modules (no copies); the slot blocks built
from them subclass the family's own block class so that transformers' output recording
(``output_hidden_states``) keeps working on a pruned encoder.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StackContext:
    """What every unit of one forward pass shares: the attention mask, T5's position bias, extra kwargs."""

    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


class UnitSequence(nn.Module):
    """Several units run one after the other (a whole pre-LN block, or a LaCo-merged block)."""

    def __init__(self, units: list[nn.Module]):
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        for unit in self.units:
            h = unit(h, ctx)
        return h


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    # transformers' T5Block clamps inf values after each sub-layer in fp16; do the same so fp16 outputs match.
    if h.dtype == torch.float16:
        clamp_value = torch.where(torch.isinf(h).any(), torch.finfo(h.dtype).max - 1000, torch.finfo(h.dtype).max)
        h = torch.clamp(h, min=-clamp_value, max=clamp_value)
    return h


# ----------------------------------------------------------------------------------------------- T5
class T5AttnUnit(nn.Module):
    """T5 MHA sub-block: h + SelfAttention(LN(h)) with the stack's position bias."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # transformers' T5LayerSelfAttention (LN + attention + residual)

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        h = self.layer(h, attention_mask=ctx.mask, position_bias=ctx.bias, **ctx.kwargs)[0]
        return _clamp_fp16(h)


class T5FFNUnit(nn.Module):
    """T5 FFN sub-block: h + FFN(LN(h))."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # transformers' T5LayerFF (LN + gated-GELU FFN + residual)

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        return _clamp_fp16(self.layer(h))


class T5RelativeBias(nn.Module):
    """T5's relative position bias, computed apart from unit 0 so it survives skipping it (SPEC §1 trap 2)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.relative_attention_bias = attention.relative_attention_bias  # the same nn.Embedding, not a copy
        self._bucket = attention._relative_position_bucket
        self.num_buckets = attention.relative_attention_num_buckets
        self.max_distance = attention.relative_attention_max_distance

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        # The same arithmetic as T5Attention.compute_bias for a bidirectional encoder, so outputs are bit-identical.
        context = torch.arange(length, dtype=torch.long, device=device)[:, None]
        memory = torch.arange(length, dtype=torch.long, device=device)[None, :]
        buckets = self._bucket(memory - context, bidirectional=True, num_buckets=self.num_buckets,
                               max_distance=self.max_distance)
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)


# ----------------------------------------------------------------------------------------------- CLIP
class CLIPAttnUnit(nn.Module):
    """CLIP text MHA sub-block: h + SelfAttn(LN1(h)) (causal mask, SD3's CLIP-L/G)."""

    def __init__(self, norm: nn.Module, attn: nn.Module):
        super().__init__()
        self.norm, self.attn = norm, attn

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        out, _ = self.attn(hidden_states=self.norm(h), attention_mask=ctx.mask, **ctx.kwargs)
        return h + out


class CLIPMLPUnit(nn.Module):
    """CLIP text FFN sub-block: h + MLP(LN2(h))."""

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


# ----------------------------------------------------------------------------------------------- BERT
class BertBlockUnit(nn.Module):
    """A whole post-LN BERT layer (the only exact unit of a post-LN encoder)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        out = self.layer(h, ctx.mask, **ctx.kwargs)
        return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------- families
class Family:
    """How one encoder family is laid out; subclasses fill in the few family-specific pieces."""

    name: str = ""
    granularities: tuple[str, ...] = ("unit", "block")
    stack_path: tuple[str, ...] = ()  # attribute path from the model to the ModuleList of blocks
    arch_keys: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def stack_path_of(self, model: nn.Module) -> tuple[str, ...]:
        """Attribute path from the model to its ModuleList of blocks."""
        return self.stack_path

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for name in self.stack_path_of(model):
            obj = getattr(obj, name)
        return obj

    def block_units(self, block: nn.Module) -> list[nn.Module]:
        """The unit modules of one original block, in order (attn, ffn; or the block itself)."""
        raise NotImplementedError

    def unit_modules(self, model: nn.Module, granularity: str) -> list[nn.Module]:
        """One module per position of a plan of this granularity, wrapping the original weights."""
        if granularity not in self.granularities:
            raise ValueError(f"{self.name} encoders can only be pruned in {' or '.join(self.granularities)}s "
                             f"(post-LN blocks have no exact sub-block removal); use granularity='block'")
        per_block = [self.block_units(b) for b in self.blocks(model)]
        if granularity == "unit":
            return [u for units in per_block for u in units]
        return [units[0] if len(units) == 1 else UnitSequence(units) for units in per_block]

    def shared_params(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters inside a unit that every pruned encoder keeps (T5's relative position bias)."""
        return []

    def prepare(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, StackContext]:
        """Embeddings and mask exactly as the original forward builds them: (hidden states, context)."""
        raise NotImplementedError

    def finish(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """From the last block's output to the model's ``last_hidden_state``."""
        return h

    def slot_block(self, model: nn.Module, units: list[nn.Module], position: int) -> nn.Module:
        """A module that stands in for the original block at ``position`` and runs ``units`` there."""
        raise NotImplementedError

    def arch(self, config: Any) -> str:
        """Short hash of the architecture hyperparameters, to tell encoders apart."""
        d = {k: getattr(config, k, None) for k in ("model_type",) + self.arch_keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


class T5Family(Family):
    name = "t5"
    stack_path = ("encoder", "block")
    arch_keys = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size", "feed_forward_proj",
                 "relative_attention_num_buckets", "relative_attention_max_distance")

    def matches(self, model: nn.Module) -> bool:
        from transformers import T5EncoderModel

        return isinstance(model, T5EncoderModel)

    def block_units(self, block: nn.Module) -> list[nn.Module]:
        return [T5AttnUnit(block.layer[0]), T5FFNUnit(block.layer[1])]

    def shared_params(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._bias(model).parameters())

    def _bias(self, model: nn.Module) -> T5RelativeBias:
        # Keep one T5RelativeBias per model so every plan view shares it.
        first = self.blocks(model)[0]
        if getattr(first, "relative_bias", None) is not None:  # already a pruned stack
            return first.relative_bias
        bias = model.__dict__.get("_skrr_relative_bias")
        if bias is None:
            bias = T5RelativeBias(first.layer[0].SelfAttention)
            # A plain attribute, not a submodule: the embedding already belongs to block 0 of the dense model.
            model.__dict__["_skrr_relative_bias"] = bias
        return bias

    def prepare(self, model, input_ids, attention_mask):
        from transformers.masking_utils import create_bidirectional_mask

        stack = model.encoder
        h = stack.embed_tokens(input_ids)
        mask = create_bidirectional_mask(config=stack.config, inputs_embeds=h, attention_mask=attention_mask)
        bias = self._bias(model)(h.shape[1], h.device)
        return stack.dropout(h), StackContext(mask=mask, bias=bias)

    def finish(self, model, h):
        return model.encoder.dropout(model.encoder.final_layer_norm(h))

    def slot_block(self, model, units, position):
        return T5SlotBlock(units, self._bias(model) if position == 0 else None)


class CLIPFamily(Family):
    name = "clip"
    arch_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "max_position_embeddings", "projection_dim", "hidden_act")

    def matches(self, model):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection))

    def stack_path_of(self, model):
        path, obj = [], model
        while hasattr(obj, "text_model"):
            path.append("text_model")
            obj = obj.text_model
        return (*path, "encoder", "layers")

    def block_units(self, block):
        return [CLIPAttnUnit(block.layer_norm1, block.self_attn), CLIPMLPUnit(block.layer_norm2, block.mlp)]

    def prepare(self, model, input_ids, attention_mask):
        from transformers.masking_utils import create_causal_mask

        tm = clip_text_model(model)
        h = tm.embeddings(input_ids=input_ids)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None)
        return h, StackContext(mask=mask, kwargs={"is_causal": True})

    def finish(self, model, h):
        return clip_text_model(model).final_layer_norm(h)

    def slot_block(self, model, units, position):
        return CLIPSlotBlock(units)


class BertFamily(Family):
    name = "bert"
    granularities = ("block",)
    stack_path = ("encoder", "layer")
    arch_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "max_position_embeddings", "hidden_act")

    def matches(self, model):
        from transformers import BertModel

        return isinstance(model, BertModel)

    def block_units(self, block):
        return [BertBlockUnit(block)]

    def prepare(self, model, input_ids, attention_mask):
        h = model.embeddings(input_ids=input_ids)
        mask, _ = model._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                                embedding_output=h, encoder_hidden_states=None,
                                                past_key_values=None)
        return h, StackContext(mask=mask)

    def slot_block(self, model, units, position):
        return BertSlotBlock(units)


FAMILIES: tuple[Family, ...] = (T5Family(), CLIPFamily(), BertFamily())


def family_of(model: nn.Module) -> Family:
    """The family of a text encoder; a one-line error names the supported classes otherwise."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise TypeError(f"unsupported text encoder {type(model).__name__}; skrr prunes T5EncoderModel, "
                    f"CLIPTextModel(WithProjection) and BertModel")


def clip_text_model(model: nn.Module) -> nn.Module:
    """The module of a CLIP text encoder that holds embeddings, encoder, final_layer_norm and eos_token_id:
    CLIPTextModelWithProjection wraps a CLIPTextModel as .text_model; transformers 5 CLIPTextModel holds them
    itself (4.x had another .text_model level)."""
    while hasattr(model, "text_model"):
        model = model.text_model
    return model


def num_blocks(model: nn.Module) -> int:
    """Number of blocks (layers) of an encoder."""
    return len(family_of(model).blocks(model))


def merge_units(units: list[nn.Module], others: list[list[nn.Module]]) -> list[nn.Module]:
    """LaCo's RDSC merge (SPEC §4): theta*_l = theta_l + sum_k (theta_{l+k} - theta_l) on every nn.Linear.

    ``units`` are block l's unit modules, ``others`` the unit modules of blocks l+1 .. l+C-1 in the same
    order. Layer norms (and everything that is not an nn.Linear) stay block l's. Returns new modules.
    """
    merged = copy.deepcopy(units)
    for m_unit, l_unit, *k_units in zip(merged, units, *others):
        base = dict(l_unit.named_modules())
        peers = [dict(u.named_modules()) for u in k_units]
        for name, mod in m_unit.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            for pname in ("weight", "bias"):
                theta_l = getattr(base[name], pname)
                if theta_l is None:
                    continue
                total = theta_l.detach().clone()
                for peer in peers:
                    total += getattr(peer[name], pname).detach() - theta_l.detach()
                getattr(mod, pname).data = total
    return merged


# ----------------------------------------------------------------------------------------------- slot blocks
# Imported lazily so that `import skrr` does not pull every transformers model in.
def _t5_block_cls():
    from transformers.models.t5.modeling_t5 import T5Block

    return T5Block


def _clip_layer_cls():
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return CLIPEncoderLayer


def _bert_layer_cls():
    from transformers.models.bert.modeling_bert import BertLayer

    return BertLayer


class _SlotBlockMixin:
    """Shared constructor: a block position running a list of unit modules (empty = identity)."""

    def _init_units(self, units: list[nn.Module]) -> None:
        nn.Module.__init__(self)  # the family block's own __init__ would allocate fresh weights
        self.units = nn.ModuleList(units)

    def _run(self, h: torch.Tensor, ctx: StackContext) -> torch.Tensor:
        for unit in self.units:
            h = unit(h, ctx)
        return h


def _make_slot_classes():
    T5Block, CLIPEncoderLayer, BertLayer = _t5_block_cls(), _clip_layer_cls(), _bert_layer_cls()

    class T5SlotBlock(_SlotBlockMixin, T5Block):
        """Stands in for a T5Block; position 0 also computes the relative position bias for the stack."""

        def __init__(self, units, relative_bias):
            self._init_units(units)
            # Registered here so .to()/state_dict reach the bias even when unit 0 itself is dropped.
            self.relative_bias = relative_bias

        def forward(self, hidden_states, attention_mask=None, position_bias=None, *args, **kwargs):
            kwargs.pop("past_key_values", None)
            if position_bias is None and self.relative_bias is not None:
                position_bias = self.relative_bias(hidden_states.shape[1], hidden_states.device)
            h = self._run(hidden_states, StackContext(mask=attention_mask, bias=position_bias, kwargs=kwargs))
            return h, position_bias, None

    class CLIPSlotBlock(_SlotBlockMixin, CLIPEncoderLayer):
        """Stands in for a CLIPEncoderLayer."""

        def __init__(self, units):
            self._init_units(units)

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return self._run(hidden_states, StackContext(mask=attention_mask, kwargs=kwargs))

    class BertSlotBlock(_SlotBlockMixin, BertLayer):
        """Stands in for a BertLayer."""

        def __init__(self, units):
            self._init_units(units)

        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            for key in ("encoder_hidden_states", "encoder_attention_mask", "past_key_values"):
                kwargs.pop(key, None)
            return self._run(hidden_states, StackContext(mask=attention_mask, kwargs=kwargs))

    return T5SlotBlock, CLIPSlotBlock, BertSlotBlock


_SLOT_CLASSES: tuple | None = None


def _slot_classes():
    global _SLOT_CLASSES
    if _SLOT_CLASSES is None:
        _SLOT_CLASSES = _make_slot_classes()
    return _SLOT_CLASSES


def T5SlotBlock(units, relative_bias):  # noqa: N802 - behaves as a class constructor
    return _slot_classes()[0](units, relative_bias)


def CLIPSlotBlock(units):  # noqa: N802
    return _slot_classes()[1](units)


def BertSlotBlock(units):  # noqa: N802
    return _slot_classes()[2](units)
