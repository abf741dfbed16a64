"""CLIP score: raw cosine per (image, own prompt) pair, checked by hand on a tiny random CLIP."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import MissingAssetError
from eval.backbones import TINY_CLIP_NAME, clip_tokenizer_offline, tiny_clip
from eval.clip_score import HFClip, clip_score_dir, clip_scores

PROMPTS = ["a photo of a cat", "a red car parked on a street", "two dogs running on a beach"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


def _photos():
    import skimage.data

    return [Image.fromarray(a) for a in (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut())]


def test_offline_tokenizer_matches_open_clip_real_bpe():
    import open_clip

    ours = clip_tokenizer_offline()
    ref = open_clip.get_tokenizer("ViT-B-32")
    for text in PROMPTS + ["An astronaut's helmet, 3 rockets & a Cat!"]:
        ids = ours(text)["input_ids"]
        ref_ids = ref([text])[0]
        assert ids == ref_ids[: len(ids)].tolist() and ref_ids[len(ids):].eq(0).all()
    assert ours("a cat")["input_ids"][0] == 49406 and ours("a cat")["input_ids"][-1] == 49407


def test_clip_score_equals_hand_computation_through_clipmodel_forward(clip):
    images = _photos()
    got = clip_scores(clip, images, PROMPTS)
    # Independent path: CLIPModel.forward's logits are logit_scale.exp() x cosine; its diagonal is each pair.
    tok = clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = clip.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    expected = out.logits_per_image.diagonal() / clip.model.logit_scale.exp()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1.0  # raw cosine, not x100


def test_clip_score_pairs_each_image_with_its_own_prompt(clip):
    images = _photos()
    straight = clip_scores(clip, images, PROMPTS)
    rolled = clip_scores(clip, images, PROMPTS[1:] + PROMPTS[:1])
    assert not torch.allclose(straight, rolled)
    assert clip_scores(clip, images[:1], PROMPTS[:1]).item() == pytest.approx(straight[0].item(), abs=1e-5)


def test_clip_score_dir_averages_over_the_manifest_and_records_the_backbone(clip, tmp_path):
    images = _photos()
    (tmp_path / "images").mkdir()
    rows = []
    for i, (im, p) in enumerate(zip(images, PROMPTS)):
        name = f"images/{i:05d}_00.png"
        im.save(tmp_path / name)
        rows.append({"file": name, "prompt_idx": i, "sample_idx": 0, "seed": i, "prompt": p})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = clip_score_dir(clip, tmp_path, batch_size=2)
    # PNG round trip is lossless, so the mean equals the in-memory scores' mean.
    expected = clip_scores(clip, [Image.open(tmp_path / r["file"]) for r in rows], PROMPTS).double().mean().item()
    assert result.value == pytest.approx(expected, abs=1e-6)
    assert result.n_images == 3 and result.backbone == TINY_CLIP_NAME and "NOT openai" in result.backbone


def test_missing_real_clip_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingAssetError, match="eval=offline") as err:
        HFClip.from_pretrained(str(tmp_path / "no-such-clip"))
    assert "\n" not in str(err.value)


def test_tiny_clip_is_deterministic_in_its_seed():
    a, b = tiny_clip(seed=0), tiny_clip(seed=0)
    assert torch.equal(a.encode_texts(PROMPTS[:1]), b.encode_texts(PROMPTS[:1]))
    assert not torch.equal(a.encode_texts(PROMPTS[:1]), tiny_clip(seed=1).encode_texts(PROMPTS[:1]))
    assert np.isfinite(a.encode_images(_photos()[:1]).numpy()).all()


def test_long_prompts_are_truncated_to_clips_77_tokens_as_open_clip_does(clip):
    import open_clip

    long = "a photo of a cat " + " ".join(f"with a hat number {i}" for i in range(40))
    ref_ids = open_clip.get_tokenizer("ViT-B-32")([long])  # [1, 77]: BOS + 75 tokens + EOS
    assert ref_ids[0, -1] == 49407 and len(clip.tokenizer(long)["input_ids"]) > 77
    with torch.no_grad():
        out = clip.model.text_model(input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids))
        expected = torch.nn.functional.normalize(clip.model.text_projection(out.pooler_output), dim=-1)
    torch.testing.assert_close(clip.encode_texts([long, PROMPTS[0]])[:1], expected, atol=1e-5, rtol=1e-5)


def test_clip_score_agrees_with_torchmetrics_on_the_same_model(clip):
    # torchmetrics' own preprocessing call, normalisation and cosine (its per-pair 100 x cos before CLIPScore's
    # clamp at 0, from _clip_score_update; torchmetrics 1.9.0 is pinned). The adapter only unwraps
    # transformers 5's output objects (torchmetrics expects plain tensors from get_*_features).
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update, clip_score
    from transformers import CLIPProcessor

    class Adapter(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    processor = CLIPProcessor(image_processor=clip.image_processor, tokenizer=clip.tokenizer)
    images = _photos()
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    ours = clip_scores(clip, images, PROMPTS)
    tm, n = _clip_score_update(tensors, PROMPTS, Adapter(clip.model), processor)
    assert n == 3 and ours.abs().min() > 0.01
    torch.testing.assert_close(tm.detach() / 100, ours, atol=2e-5, rtol=1e-4)
    # The public CLIPScore is max(100 x mean cosine, 0): not the paper's raw cosine (ours is negative here).
    public = clip_score(tensors, PROMPTS, model_name_or_path=lambda: (Adapter(clip.model), processor))
    assert public.item() == pytest.approx(max(100 * ours.mean().item(), 0.0), abs=2e-3)
