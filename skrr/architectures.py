"""Architecture hyperparameters of the paper's models (facts from their published configs), built on the
meta device so parameter counts need no weights (SPEC §1, Table 2)."""
from __future__ import annotations

from typing import Any

import torch

# google/t5-v1_1-xxl encoder, the T5 of PixArt-Σ, SD3 and FLUX (SPEC §1).
T5_V1_1_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6)

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (DiT-XL/2, 28 blocks, width 1152).
PIXART_SIGMA_XL_2 = dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                         in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                         caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
                         norm_eps=1e-6, use_additional_conditions=False, attention_bias=True,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, interpolation_scale=2)

# The SD/SDXL VAE (PixArt-Σ's vae/config.json): 4 levels, 4 latent channels.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024)


def t5_xxl_encoder(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> Any:
    """T5-v1.1-XXL encoder with random (or, on meta, no) weights: real shapes, real compute."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**T5_V1_1_XXL, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
                   dropout_rate=0.0)
    cfg._name_or_path = "google/t5-v1_1-xxl"
    with torch.device(device):
        return T5EncoderModel(cfg).to(dtype).eval()


def pixart_sigma_transformer(device: str | torch.device = "meta") -> Any:
    """PixArt-Σ XL/2 denoiser (610,856,096 parameters)."""
    from diffusers import PixArtTransformer2DModel

    with torch.device(device):
        return PixArtTransformer2DModel(**PIXART_SIGMA_XL_2)


def sd_vae(device: str | torch.device = "meta") -> Any:
    """SD VAE; only its decoder path (post_quant_conv + decoder) runs at generation time."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SD_VAE)
