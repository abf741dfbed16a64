"""CLIP score: the raw cosine (not x100, no clamp) between each image and its own prompt, averaged (SPEC §5).

Default backbone ``openai/clip-vit-base-patch32`` (dense PixArt-Σ scores 0.314 in the paper). Computed here
rather than with torchmetrics, whose CLIPScore breaks on transformers 5 (``get_image_features`` returns an
output object there); we call the vision/text towers and their projections directly, which is the same on
transformers 4 and 5.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from eval import MissingAssetError
from eval.generate import complete_manifest

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


class HFClip:
    """A transformers ``CLIPModel`` with its tokenizer and image processor; encodes to unit-norm float32 vectors."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, name: str,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                        dtype: str = "float32", cache_dir: str | None = None) -> HFClip:
        """Load a CLIP from the hub or a local folder (fp32 by default: the score is a 3-decimal number)."""
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(model_id, dtype=getattr(torch, dtype), cache_dir=cache_dir)
            processor = CLIPProcessor.from_pretrained(model_id, cache_dir=cache_dir)
        except OSError as err:
            raise MissingAssetError(f"CLIP {model_id!r} is not available (offline or not cached); download it "
                                    f"once or set eval.clip.backbone.model_id to a local folder, or use eval=offline"
                                    ) from err
        return cls(model, processor.tokenizer, processor.image_processor, name=model_id, device=device)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [N, d] unit vectors (vision tower pooled output, then the visual projection)."""
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> [N, d] unit vectors (truncated to CLIP's 77 tokens)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1).cpu()


def clip_model(model_id: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: str = "float32",
               cache_dir: str | None = None) -> HFClip:
    """Config entry point (``_target_``) for the real CLIP backbone."""
    return HFClip.from_pretrained(model_id, device=device, dtype=dtype, cache_dir=cache_dir)


def clip_scores(backbone: Any, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """Cosine between image i and prompt i, for each i (a vector, not the N x N matrix)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return (backbone.encode_images(images) * backbone.encode_texts(prompts)).sum(dim=-1)


@dataclass(frozen=True)
class ClipScoreResult:
    """Mean raw cosine over the images of a run, with the backbone that produced it."""

    value: float
    n_images: int
    backbone: str
    std: float


def clip_score_dir(backbone: Any, images_dir: str | Path, batch_size: int = 32) -> ClipScoreResult:
    """CLIP score of every image listed in ``images_dir/manifest.jsonl`` against its own prompt."""
    images_dir = Path(images_dir)
    rows = complete_manifest(images_dir)
    scores = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        images = [Image.open(images_dir / r["file"]).convert("RGB") for r in batch]
        scores.append(clip_scores(backbone, images, [r["prompt"] for r in batch]))
    s = torch.cat(scores).double()
    log.info("CLIP score %.4f over %d images (%s)", s.mean().item(), len(s), backbone.name)
    return ClipScoreResult(float(s.mean()), len(s), backbone.name, float(s.std()) if len(s) > 1 else 0.0)
