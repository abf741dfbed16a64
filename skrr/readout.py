"""What SD3's denoiser receives from one of its CLIP text encoders: the features a CLIP plan is scored on.

Skrr's discrepancy (SPEC §2, paper Eq. 3-4) compares what the denoiser receives. For T5 (PixArt-Σ, SD3, FLUX)
and SD2's CLIP that is one tensor, the encoder's ``last_hidden_state`` through the denoiser's caption
projection (``CalibrationSet``'s ``projection``). SD3's CLIP-L and CLIP-G feed it twice, read from diffusers
0.42.1 ``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` (``StableDiffusion3Pipeline``):

- ``_get_clip_prompt_embeds``: the ids padded to 77 without a mask, ``hidden_states[-2]`` (the input of the
  last block, no final norm; ``clip_skip=None``) and the pooled ``text_embeds`` (output [0]);
- ``encode_prompt``: CLIP-L's and CLIP-G's hidden states concatenated on the feature axis, zero padded to T5's
  width and put before T5's rows -> ``transformer.context_embedder``; the two pooled vectors concatenated ->
  ``transformer.time_text_embed.text_embedder`` (the pooled projection, added to the timestep embedding that
  modulates every block).

``SD3ClipReadout`` computes both, with the other CLIP's dense features in their places (each encoder is
searched with the others dense, our choice), and packs them into one tensor [N, 77 + r, width] scaled so that
the plain mean squared error over it is

    D_clip = MSE(context rows) + pooled_weight x MSE(pooled projection)         (our choice, pooled_weight = 1)

i.e. each of the two inputs weighs as one term, as the paper's D weighs the prompt term and the ∅ term
(``calib.pooled_weight``). Only the 77 CLIP rows enter the context term: T5's rows are the same for every CLIP
plan. The last block reaches the denoiser through the pooled path only; it is a candidate like any other unit
unless ``calib.clip_last_block=false`` (then ``protected`` holds its units and the search never skips them).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from skrr.encoding import PromptEncoding
from skrr.families import clip_text_model, num_blocks

SIDES = ("clip_l", "clip_g")  # SD3's text_encoder and text_encoder_2, in the order encode_prompt concatenates them


def eos_positions(encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Where CLIP pools each sequence: transformers' ``CLIPTextTransformer.forward`` (modeling_clip.py) takes the
    highest id when the config's eos_token_id is the pre-#24773 value 2, else the first eos token."""
    eos = clip_text_model(encoder).eos_token_id
    ids = input_ids.to(torch.int)
    return ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)


def pooled_embeds(encoder: nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIPTextModelWithProjection's ``text_embeds``: the final-normed state at the pooled token, projected."""
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_positions(encoder, input_ids).to(last_hidden_state.device)]
    return encoder.text_projection(pooled)


@torch.no_grad()
def sd3_clip_outputs(encoder: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states[-2] [N, 77, d], text_embeds [N, p]) of a dense CLIP, called as SD3's
    ``_get_clip_prompt_embeds`` calls it (the encoder's own forward)."""
    encoding = sd3_clip_encoding(tokenizer)
    hidden, pooled = [], []
    for a in range(0, len(prompts), batch_size):
        ids, _ = encoding.tokenize(tokenizer, prompts[a:a + batch_size])
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden), torch.cat(pooled)


def sd3_clip_encoding(tokenizer: Any) -> PromptEncoding:
    """How SD3 tokenizes for a CLIP: padded to the tokenizer's model_max_length (77), no mask."""
    return PromptEncoding("sd3_clip", int(tokenizer.model_max_length))


class SD3ClipReadout(nn.Module):
    """Maps one SD3 CLIP's states to what the denoiser receives from it, packed for a plain MSE (module doc).

    ``other_hidden`` / ``other_pooled``: the other CLIP's dense ``hidden_states[-2]`` and ``text_embeds`` for every
    calibration prompt in order and then ∅ (row -1), which stand beside this encoder's features in the
    concatenations. ``context`` (``context_embedder``) and ``pooled`` (``time_text_embed.text_embedder``) are the
    denoiser's modules, ``joint_width`` the width SD3 pads the CLIP features to (T5's, the context embedder's
    input). With ``use_projection=False`` the features are the encoder's own outputs (Table A13's ablation).
    """

    def __init__(self, side: str, encoder: nn.Module, other_hidden: torch.Tensor, other_pooled: torch.Tensor,
                 context: nn.Module | None, pooled: nn.Module | None, *, pooled_weight: float = 1.0,
                 clip_last_block: bool = True, use_projection: bool = True):
        super().__init__()
        if side not in SIDES:
            raise ValueError(f"unknown SD3 CLIP {side!r}; choose one of {SIDES}")
        if not (pooled_weight >= 0 and math.isfinite(pooled_weight)):
            raise ValueError(f"calib.pooled_weight must be a finite number >= 0, got {pooled_weight}")
        if use_projection and (context is None or pooled is None):
            raise ValueError("use_projection=True needs SD3's context_embedder and time_text_embed.text_embedder")
        self.side, self.encoder = side, encoder
        self.pooled_weight, self.clip_last_block, self.use_projection = float(pooled_weight), clip_last_block, use_projection
        self.register_buffer("other_hidden", other_hidden, persistent=False)
        self.register_buffer("other_pooled", other_pooled, persistent=False)
        self.context = context if use_projection else None
        self.pooled = pooled if use_projection else None
        self.blocks = num_blocks(encoder)

    # The position whose input state the context term reads: the last block's first unit (or the block itself).
    def tap(self, granularity: str) -> int:
        return 2 * (self.blocks - 1) if granularity == "unit" else self.blocks - 1

    def protected(self, granularity: str) -> tuple[int, ...]:
        """Positions the search must keep (the last block's, with ``clip_last_block=False``)."""
        if self.clip_last_block:
            return ()
        t = self.tap(granularity)
        return (t, t + 1) if granularity == "unit" else (t,)

    def settings(self) -> dict[str, Any]:
        """What changes D (part of the calibration settings and of the plan cache key)."""
        return {"readout": f"sd3_{self.side}", "pooled_weight": self.pooled_weight,
                "clip_last_block": self.clip_last_block}

    def _concat(self, mine: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """CLIP-L first, then CLIP-G (encode_prompt's ``torch.cat([prompt_embed, prompt_2_embed], dim=-1)``)."""
        return torch.cat([mine, other] if self.side == "clip_l" else [other, mine], dim=-1)

    @torch.no_grad()
    def forward(self, last_hidden_state: torch.Tensor, tap_state: torch.Tensor, input_ids: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """Packed features [n, 77 + r, width] (float32) of n sequences; ``input_ids`` and ``rows`` (prompt index,
        -1 = ∅) belong to the n // len(rows) blocks of len(rows) sequences each (several plans, node-major)."""
        repeat = last_hidden_state.shape[0] // rows.shape[0]
        ids = input_ids.repeat(repeat, 1)
        text = pooled_embeds(self.encoder, last_hidden_state, ids)
        if self.use_projection:
            width = self.context.in_features
            other_h = self.other_hidden[rows].repeat(repeat, 1, 1).to(tap_state.dtype)
            joint = self._concat(tap_state, other_h)
            joint = nn.functional.pad(joint, (0, width - joint.shape[-1]))  # encode_prompt's pad to T5's width
            ctx = self.context(joint)
            other_p = self.other_pooled[rows].repeat(repeat, 1).to(text.dtype)
            pooled = self.pooled(self._concat(text, other_p))
        else:
            ctx, pooled = tap_state, text
        return pack(ctx.float(), pooled.float(), self.pooled_weight)


def pack(ctx: torch.Tensor, pooled: torch.Tensor, pooled_weight: float) -> torch.Tensor:
    """[n, L, w] context features and [n, p] pooled features as one [n, L + r, w] tensor (r = ceil(p / w), zero
    padded) scaled so that its plain mean squared error is MSE(ctx) + pooled_weight x MSE(pooled):
    with E = (L + r) w elements per prompt, ctx is scaled by sqrt(E / (L w)) and pooled by
    sqrt(pooled_weight E / p), so sum / (n E) = sum_ctx / (n L w) + pooled_weight sum_pooled / (n p)."""
    n, length, width = ctx.shape
    p = pooled.shape[-1]
    r = -(-p // width)
    elements = (length + r) * width
    tail = nn.functional.pad(pooled, (0, r * width - p)).view(n, r, width)
    return torch.cat([ctx * math.sqrt(elements / (length * width)),
                      tail * math.sqrt(pooled_weight * elements / p)], dim=1)
