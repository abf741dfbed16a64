"""Tiny models built from configs, offline, in seconds: encoders, tokenizers, PixArt-Σ / SD3 / FLUX denoisers.

Random weights; for tests, the offline demo, and for anyone who wants to try the code path without weights.
The shapes follow the real families (T5 v1.1 gated-GELU with relative bias in block 0, pre-LN CLIP text,
post-LN BERT); the sizes are small enough that a whole pipeline runs in well under a second on CPU.
"""
from __future__ import annotations

import gzip
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

TINY_T5_NAME = "skrr/tiny-t5"

# Sentences the tiny tokenizer is trained on (written for this project); any English prompt tokenizes,
# unknown pieces fall back to characters.
_TOKENIZER_CORPUS = [
    "a photo of a cat sitting on a red sofa next to a window",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit with apples, bananas and oranges on a wooden table",
    "two dogs playing in the snow in front of a blue house",
    "a city street at night with neon lights and rain",
    "a watercolor painting of mountains and a lake at sunrise",
    "a green bicycle leaning against a brick wall",
    "three birds flying over the ocean under a cloudy sky",
    "a close up of a yellow flower with a bee",
    "a black and white photograph of an old train station",
    "a purple car parked to the left of a white truck",
    "a pink cake with candles on a plate, studio lighting",
    "the quick brown fox jumps over the lazy dog",
    "portrait of a woman wearing a hat, oil painting, highly detailed",
    "a small boat on a river surrounded by green trees",
    "a kitchen with a stove, a sink and a refrigerator",
]


def tiny_t5_tokenizer(vocab_size: int = 160) -> Any:
    """A T5 tokenizer (pad 0, eos 1, unk 2) from a SentencePiece unigram model trained in memory."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(proc.id_to_piece(i), proc.get_score(i)) for i in range(proc.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(num_layers: int = 4, d_model: int = 32, d_ff: int = 64, num_heads: int = 4, vocab_size: int = 160,
            seed: int = 0, name: str = TINY_T5_NAME) -> Any:
    """A T5 v1.1-style encoder (gated-GELU, RMS LayerNorm, relative bias in block 0), random weights, eval."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                   num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    cfg._name_or_path = name
    torch.manual_seed(seed)
    model = T5EncoderModel(cfg).eval()
    # Relative bias init is tiny by default; make it visible so tests can see whether it is applied.
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1.0)
    return model


def tiny_clip_text(num_layers: int = 3, hidden: int = 32, seed: int = 0, projection: bool = False,
                   real_vocab: bool = False, projection_dim: int = 16, name: str = "skrr/tiny-clip-text",
                   intermediate: int | None = None) -> Any:
    """A pre-LN CLIP text encoder (causal attention, quick-GELU), random weights, eval.

    ``real_vocab``: OpenAI CLIP's 49,408 tokens and 77 positions, for ``clip_tokenizer()`` (tiny pipelines).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407) if real_vocab else dict(vocab_size=100, max_position_embeddings=32,
                                                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=4, projection_dim=projection_dim, **vocab)
    cfg._name_or_path = name
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


@lru_cache(maxsize=1)
def _open_clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of OpenAI CLIP's BPE, from the copy bundled inside open_clip (real, offline)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary not found at {path}; reinstall open_clip_torch")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # the 48,894 merges CLIP uses
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> Any:
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's real vocabulary (49,408 tokens, 77 positions),
    built offline from open_clip's bundled BPE (SD3's and FLUX's CLIP tokenizers use this vocabulary)."""
    from transformers import CLIPTokenizer

    vocab, merges = _open_clip_bpe()
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges))
    tok.model_max_length = 77
    return tok


def tiny_bert(num_layers: int = 3, hidden: int = 32, seed: int = 0) -> Any:
    """A post-LN BERT encoder, random weights, eval."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._name_or_path = "skrr/tiny-bert"
    torch.manual_seed(seed)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_pixart_transformer(caption_channels: int, seed: int = 0) -> Any:
    """A 2-layer PixArt-Σ DiT (adaLN-single, cross-attention on the caption) for 8x8 latents."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=caption_channels,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    ).eval()


def tiny_vae(seed: int = 0, shift_factor: float | None = None) -> Any:
    """A one-level AutoencoderKL with 4 latent channels (x8 down-sampling is not needed at this size);
    SD3 and FLUX read a ``shift_factor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                         shift_factor=shift_factor).eval()


def tiny_sd3_transformer(joint_attention_dim: int, pooled_projection_dim: int, seed: int = 0) -> Any:
    """A 2-layer SD3 MMDiT for 4-channel latents up to 32x32; ``context_embedder`` maps T5's width in."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, caption_projection_dim=16,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=32,
    ).eval()


def tiny_flux_transformer(joint_attention_dim: int, pooled_projection_dim: int, seed: int = 0) -> Any:
    """A FLUX MMDiT (one double, one single block) on 2x2-packed 4-channel latents, with guidance embedding
    as FLUX.1-dev; ``context_embedder`` maps T5's width in."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_unet(cross_attention_dim: int, seed: int = 0) -> Any:
    """A two-level SD2-style U-Net (UNet2DConditionModel: ResNet + cross-attention transformer blocks with
    linear projections, as stable-diffusion-2-1-base) for 4-channel latents, random weights, eval."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=True,
    ).eval()
