"""How each pipeline runs its text encoder (T5, or SD2's CLIP) on a prompt: one definition for calibration and generation.

SPEC §1 trap 3: Skrr's discrepancy must be computed on the features the denoiser actually receives, so the
calibration set tokenizes and encodes exactly as the pipeline's own ``encode_prompt`` does, and generation
passes the same length (and caption cleaning) to the pipeline call. Read from diffusers 0.42.1
(``diffusers/pipelines/...``):

- PixArt-Σ, ``pixart_alpha/pipeline_pixart_sigma.py``, ``PixArtSigmaPipeline.encode_prompt``: the caption is
  cleaned first (``__call__``'s ``clean_caption=True`` -> ``_text_preprocessing``: lower case, no URLs/HTML),
  then ``text_encoder(ids, attention_mask=mask)[0]``; the mask also goes to the denoiser's cross-attention.
- SD3, ``stable_diffusion_3/pipeline_stable_diffusion_3.py``, ``StableDiffusion3Pipeline._get_t5_prompt_embeds``:
  ``text_encoder_3(ids)[0]``, no mask; ``encode_prompt`` puts these rows after CLIP-L/G's 77.
- FLUX, ``flux/pipeline_flux.py``, ``FluxPipeline._get_t5_prompt_embeds``:
  ``text_encoder_2(ids, output_hidden_states=False)[0]``, no mask.
- SD2, ``stable_diffusion/pipeline_stable_diffusion.py``, ``StableDiffusionPipeline.encode_prompt``: its CLIP
  text encoder, ``text_encoder(ids, attention_mask=None)[0]`` with ``clip_skip=None`` (the output after the final
  layer norm), 77 positions; the U-Net's cross-attention reads it directly.

All of them tokenize with ``padding="max_length"``, ``max_length=max_sequence_length``, ``truncation=True`` and
special tokens, and cast the output to the text encoder's dtype. So every prompt has
``max_sequence_length`` positions; without the mask (SD3, FLUX) valid tokens attend to the padding and the
denoiser sees T5's output at every padded position, so there the padded positions are part of what is scored
and cannot be cut off (``CalibrationSet``). SD2 pads to the tokenizer's ``model_max_length`` (77) and passes a mask
only when the encoder's config sets ``use_attention_mask`` (SD2's OpenCLIP ViT-H does not); its ``__call__`` has no
``max_sequence_length`` argument, so the length is the pipeline config's and nothing is passed at generation.
Tests compare ``PromptEncoding`` with what each real pipeline class hands its denoiser (tests/test_encoding.py,
tests/test_sd2.py), so a diffusers change that this file misses fails there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch
from torch import nn

# Per pipeline family: does T5 get the attention mask, does the pipeline clean captions, where diffusers says so.
FAMILIES: dict[str, dict[str, Any]] = {
    "pixart_sigma": {"mask": True, "cleans_captions": True,
                     "source": "diffusers/pipelines/pixart_alpha/pipeline_pixart_sigma.py: "
                               "PixArtSigmaPipeline.encode_prompt"},
    "sd3": {"mask": False, "cleans_captions": False,
            "source": "diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py: "
                      "StableDiffusion3Pipeline._get_t5_prompt_embeds"},
    "flux": {"mask": False, "cleans_captions": False,
             "source": "diffusers/pipelines/flux/pipeline_flux.py: FluxPipeline._get_t5_prompt_embeds"},
    # SD2's CLIP text encoder: encode_prompt passes the mask only if text_encoder.config.use_attention_mask
    # (not set for SD2), takes output [0] (last_hidden_state, after final_layer_norm) with clip_skip=None.
    "sd2": {"mask": False, "cleans_captions": False, "length_kwarg": False,
            "source": "diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py: "
                      "StableDiffusionPipeline.encode_prompt"},
    # SD3's CLIP-L and CLIP-G (_get_clip_prompt_embeds): padded to the tokenizer's 77, no mask, hidden_states[-2]
    # and the pooled text_embeds (skrr/readout.py); the call's max_sequence_length is T5's, not theirs.
    "sd3_clip": {"mask": False, "cleans_captions": False, "length_kwarg": False,
                 "source": "diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py: "
                           "StableDiffusion3Pipeline._get_clip_prompt_embeds"},
    # A text encoder on its own (no pipeline): masked, no caption cleaning. Scripts and unit tests.
    "plain": {"mask": True, "cleans_captions": False, "source": "the encoder's own forward with its mask"},
}


@dataclass(frozen=True)
class PromptEncoding:
    """How a pipeline family calls its T5: text cleaning, padding to ``max_length``, mask or not, output [0]."""

    family: str = "plain"
    max_length: int = 300
    clean_caption: bool = False  # PixArt-Σ only: diffusers' __call__ default is True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown prompt encoding {self.family!r}; choose one of {sorted(FAMILIES)}")
        if self.max_length < 1:
            raise ValueError(f"pipeline.max_sequence_length must be positive, got {self.max_length}")
        if self.clean_caption and not FAMILIES[self.family]["cleans_captions"]:
            raise ValueError(f"{self.family} pipelines do not clean captions; set pipeline.clean_caption=false")

    @property
    def masks_encoder(self) -> bool:
        """Whether the attention mask is passed to T5 (PixArt-Σ yes; SD3 and FLUX no)."""
        return bool(FAMILIES[self.family]["mask"])

    @property
    def source(self) -> str:
        """The diffusers function this encoding follows."""
        return str(FAMILIES[self.family]["source"])

    def preprocess(self, prompts: Sequence[str]) -> list[str]:
        """The text the tokenizer gets: PixArt-Σ lower-cases and strips (and with clean_caption removes URLs,
        HTML, ...) by diffusers' own ``_text_preprocessing``; SD3 and FLUX leave it as is."""
        if not FAMILIES[self.family]["cleans_captions"]:
            return list(prompts)
        return _pixart_preprocessor()._text_preprocessing(list(prompts), clean_caption=self.clean_caption)

    def tokenize(self, tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, valid-token mask), both [N, max_length], as the pipeline tokenizes."""
        tok = tokenizer(self.preprocess(prompts), padding="max_length", max_length=self.max_length,
                        truncation=True, add_special_tokens=True, return_tensors="pt")
        return tok.input_ids, tok.attention_mask

    def encoder_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The mask T5 gets: the tokenizer's (PixArt-Σ) or none (SD3, FLUX: full attention over the padding)."""
        return attention_mask if self.masks_encoder else None

    @torch.no_grad()
    def encode(self, encoder: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """T5's ``last_hidden_state`` [N, max_length, d] as the pipeline computes it (the features the denoiser's
        caption projection receives)."""
        ids, mask = self.tokenize(tokenizer, prompts)
        device = next(encoder.parameters()).device
        mask = self.encoder_mask(mask)
        out = encoder(ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]
        return out.to(next(encoder.parameters()).dtype)

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call that make generation encode the same way."""
        if not FAMILIES[self.family].get("length_kwarg", True):
            return {}  # SD2: the tokenizer's model_max_length is the length; the call takes no such argument
        kwargs: dict[str, Any] = {"max_sequence_length": self.max_length}
        if FAMILIES[self.family]["cleans_captions"]:
            kwargs["clean_caption"] = self.clean_caption
        return kwargs

    def describe(self) -> dict[str, Any]:
        """What changes the features (recorded with the calibration settings and in the plan cache key)."""
        return {"family": self.family, "max_length": self.max_length, "encoder_mask": self.masks_encoder,
                "clean_caption": self.clean_caption}


@lru_cache(maxsize=1)
def _pixart_preprocessor() -> Any:
    """An empty PixArtSigmaPipeline whose ``_text_preprocessing`` is diffusers' own caption cleaning (it reads
    no component), so calibration text is cleaned by the very code generation runs."""
    from diffusers import PixArtSigmaPipeline

    return object.__new__(PixArtSigmaPipeline)
