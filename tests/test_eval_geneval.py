"""GenEval: the official decision rules on hand-built detections (every tag, right and wrong), colour and detection."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import EvalError
from eval.geneval import (COLORS, OBJECT_NAMES, ClipColorClassifier, Detection, Mask2FormerDetector, MmdetPreprocess,
                          box_from_mask, evaluate_rules, geneval_dir, keep_detections, masked_crop, mmdet_postprocess,
                          relative_position, task_scores)


def det(x1, y1, x2, y2, score=0.95, color=None):
    """A detection; ``color`` is read by the fake colour classifier below (the rules never look at it)."""
    d = Detection((x1, y1, x2, y2), score)
    object.__setattr__(d, "_color", color)
    return d


def fake_color(classname, objects):
    return [getattr(o, "_color", None) or "black" for o in objects]


def judge(raw, meta):
    return evaluate_rules(keep_detections(raw, meta["tag"]), meta, fake_color)[0]


# ------------------------------------------------------------------ filtering

def test_keep_detections_thresholds_sorts_and_caps_at_16():
    raw = {"dog": [det(0, 0, 1, 1, s) for s in np.linspace(0.31, 0.99, 20)] + [det(0, 0, 1, 1, 0.3)]}
    kept = keep_detections(raw, "two_object")
    assert len(kept["dog"]) == 16 and kept["dog"][0].score == pytest.approx(0.99)
    assert all(a.score >= b.score for a, b in zip(kept["dog"], kept["dog"][1:]))
    assert keep_detections({"dog": [det(0, 0, 1, 1, 0.3)]}, "single_object") == {}  # strictly greater than 0.3
    assert keep_detections({"dog": [det(0, 0, 1, 1, 0.85)]}, "counting") == {}  # 0.9 for counting


# ------------------------------------------------------------------ every tag: a correct and an incorrect case

def test_single_object():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert judge({"dog": [det(0, 0, 10, 10, 0.5)]}, meta)
    assert not judge({"dog": [det(0, 0, 10, 10, 0.25)], "cat": [det(0, 0, 5, 5)]}, meta)


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "tv remote", "count": 1}]}
    assert judge({"dog": [det(0, 0, 10, 10)], "tv remote": [det(20, 0, 30, 10, 0.4)]}, meta)
    assert not judge({"dog": [det(0, 0, 10, 10)]}, meta)


def test_counting_uses_the_09_threshold_and_the_exclude_clause():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    three = [det(i * 10, 0, i * 10 + 5, 5, 0.95) for i in range(3)]
    # A fourth cat at 0.8 is dropped by the 0.9 threshold: still exactly three -> correct.
    assert judge({"cat": three + [det(50, 0, 55, 5, 0.8)]}, meta)
    # ... but at 0.92 it counts, and the exclude clause (>= 4) fails the image.
    assert not judge({"cat": three + [det(50, 0, 55, 5, 0.92)]}, meta)
    # Two confident cats and one at 0.85: only two pass 0.9 -> too few.
    assert not judge({"cat": three[:2] + [det(50, 0, 55, 5, 0.85)]}, meta)


def test_colors_checks_only_the_most_confident_objects():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert judge({"car": [det(0, 0, 10, 10, 0.9, "red")]}, meta)
    assert not judge({"car": [det(0, 0, 10, 10, 0.9, "blue")]}, meta)
    # The red car is the second most confident: only the top ``count`` objects are classified -> wrong.
    assert not judge({"car": [det(0, 0, 10, 10, 0.9, "blue"), det(20, 0, 30, 10, 0.5, "red")]}, meta)


def test_color_attr_needs_each_object_in_its_own_colour():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                             {"class": "bench", "count": 1, "color": "green"}]}
    assert judge({"bus": [det(0, 0, 9, 9, 0.9, "yellow")], "bench": [det(20, 0, 29, 9, 0.9, "green")]}, meta)
    assert not judge({"bus": [det(0, 0, 9, 9, 0.9, "green")], "bench": [det(20, 0, 29, 9, 0.9, "yellow")]}, meta)


def test_colour_clause_without_classifier_is_an_error():
    with pytest.raises(EvalError, match="colour"):
        evaluate_rules({"car": [det(0, 0, 1, 1)]}, {"tag": "colors", "include": [{"class": "car", "count": 1,
                                                                                  "color": "red"}]})


# Position: A relative to B (target clause 0). Image y points down: "above" means a smaller y.
POSITIONS = {
    "left of": ((0, 40, 20, 60), (60, 40, 80, 60)),
    "right of": ((60, 40, 80, 60), (0, 40, 20, 60)),
    "above": ((40, 0, 60, 20), (40, 60, 60, 80)),
    "below": ((40, 60, 60, 80), (40, 0, 60, 20)),
}


@pytest.mark.parametrize("relation", list(POSITIONS))
def test_position_each_relation_right_and_wrong(relation):
    a, b = POSITIONS[relation]
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "dog", "count": 1, "position": [relation, 0]}]}
    assert judge({"bench": [det(*b)], "dog": [det(*a)]}, meta)
    assert not judge({"bench": [det(*a)], "dog": [det(*b)]}, meta)  # swapped: the opposite relation


def test_position_checks_every_target_object_and_every_checked_object():
    # Two benches are the target (count 2): the dog must be left of both; one bench to its left fails it.
    meta = {"tag": "position", "include": [{"class": "bench", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    dog, right, far_right, left = (20, 40, 30, 50), (60, 40, 70, 50), (90, 40, 99, 50), (0, 40, 5, 50)
    assert judge({"bench": [det(*right, 0.9), det(*far_right, 0.8)], "dog": [det(*dog)]}, meta)
    assert not judge({"bench": [det(*right, 0.9), det(*left, 0.8)], "dog": [det(*dog)]}, meta)
    # Two dogs are checked (count 2): the second, less confident one is right of the bench -> wrong.
    meta2 = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                            {"class": "dog", "count": 2, "position": ["left of", 0]}]}
    assert judge({"bench": [det(*right)], "dog": [det(*dog, 0.9), det(*left, 0.8)]}, meta2)
    assert not judge({"bench": [det(*right)], "dog": [det(*dog, 0.9), det(*far_right, 0.8)]}, meta2)
    # The target index is honoured: relative to clause 1 (the car on the right), not clause 0.
    meta3 = {"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "car", "count": 1},
                                            {"class": "dog", "count": 1, "position": ["left of", 1]}]}
    assert judge({"bench": [det(*left)], "car": [det(*right)], "dog": [det(*dog)]}, meta3)
    assert not judge({"bench": [det(*right)], "car": [det(*left)], "dog": [det(*dog)]}, meta3)


def test_position_fails_without_a_target():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    ok, reason = evaluate_rules({"dog": [det(0, 0, 1, 1)]}, meta, fake_color)
    assert not ok and "no target" in reason


def test_relative_position_shrink_and_half_rule_by_hand():
    # Centres (5, 5) and (15, 13): offset (-10, -8); sizes sum (20, 20) -> shrink by 2 per axis -> (-8, -6);
    # divided by |offset| = 12.81 -> (-0.62, -0.47): left of (< -0.5) but not above (> -0.5).
    a, b = det(0, 0, 10, 10), det(10, 8, 20, 18)
    assert relative_position(a, b) == {"left of"}
    # Without the 0.1 shrink dy would be -8 / 12.81 = -0.62 and "above" would be added.
    assert relative_position(a, b, shrink=0.0) == {"left of", "above"}
    # Heavily overlapping boxes: everything shrinks to zero -> no relation at all.
    assert relative_position(det(0, 0, 10, 10), det(1, 1, 11, 11)) == set()
    # A diagonal offset gives two relations.
    assert relative_position(det(50, 50, 60, 60), det(0, 0, 10, 10)) == {"right of", "below"}


@pytest.mark.parametrize("sx, sy, expected", [(-1, -1, "above"), (1, -1, "above"), (-1, 1, "below"),
                                               (1, 1, "below")])
def test_relative_position_half_rule_boundary_on_every_side(sx, sy, expected):
    # Point boxes (no shrink), unit direction (0.45, 0.893): only the axis beyond 0.5 gives a relation.
    a, b = det(50, 50, 50, 50), det(50 - sx * 45, 50 - sy * 89.3, 50 - sx * 45, 50 - sy * 89.3)
    assert relative_position(a, b) == {expected}
    a, b = det(50, 50, 50, 50), det(50 - sy * 89.3, 50 - sx * 45, 50 - sy * 89.3, 50 - sx * 45)  # axes swapped
    assert relative_position(a, b) == {"left of" if sy < 0 else "right of"}


def test_task_scores_average_tasks_not_images():
    results = [{"tag": "single_object", "correct": True}] * 3 + [{"tag": "position", "correct": False}]
    per_task, overall = task_scores(results)
    assert per_task == {"single_object": 1.0, "position": 0.0} and overall == 0.5  # images would give 0.75


# ------------------------------------------------------------------ colour: masked onto grey, cropped, zero-shot

def _two_colour_image():
    img = np.zeros((20, 20, 3), np.uint8)
    img[:] = (0, 0, 255)  # blue everywhere
    img[6:10, 6:10] = (255, 0, 0)  # a red 4x4 object
    mask = np.zeros((20, 20), bool)
    mask[6:10, 6:10] = True
    return Image.fromarray(img), mask


def test_masked_crop_pastes_the_object_on_grey_and_crops_to_the_box():
    image, mask = _two_colour_image()
    crop = np.asarray(masked_crop(image, Detection((4.4, 4.4, 12.2, 12.2), 0.9, mask)))
    assert crop.shape == (8, 8, 3)  # PIL rounds the box to (4, 4, 12, 12)
    assert (crop[2:6, 2:6] == (255, 0, 0)).all()
    outside = np.ones((8, 8), bool)
    outside[2:6, 2:6] = False
    assert (crop[outside] == (153, 153, 153)).all()  # #999


class _MeanColourModel:
    """A stand-in CLIP: an image embeds as its mean colour minus grey, a prompt as its colour word's RGB minus grey."""

    RGB = {"red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 160, 0),
           "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 170, 200), "brown": (140, 80, 20),
           "black": (0, 0, 0), "white": (255, 255, 255)}

    def encode_image(self, x):
        return x - 153.0 / 255.0

    def encode_text(self, prompts):
        vecs = []
        for p in prompts:
            word = next(c for c in sorted(self.RGB, key=len, reverse=True) if f" {c} " in f" {p} " or f"{c}-" in p)
            vecs.append(torch.tensor(self.RGB[word], dtype=torch.float32) / 255.0 - 153.0 / 255.0)
        return torch.stack(vecs)


def test_colour_classifier_sees_only_the_masked_object():
    image, mask = _two_colour_image()
    preprocess = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255.0).reshape(-1, 3).mean(0)  # noqa: E731
    clf = ClipColorClassifier(_MeanColourModel(), preprocess, lambda texts: list(texts), name="mean-colour")
    box = (2.0, 2.0, 18.0, 18.0)  # mostly blue pixels inside the box
    assert clf(image, "car", [Detection(box, 0.9, mask)]) == ["red"]
    assert clf(image, "car", [Detection(box, 0.9, None)]) == ["blue"]  # unmasked, the background wins
    assert clf.classifier("car").shape == (3, len(COLORS))
    assert clf.templates("car")[1].format(c="red") == "a photo of a red-colored car"


# ------------------------------------------------------------------ detection post-processing (mmdet-style)

def test_mmdet_postprocess_boxes_from_upsampled_masks_and_labels_by_index():
    num_classes = 80
    cls = torch.zeros(2, num_classes + 1)
    cls[0, OBJECT_NAMES.index("dog")] = 10.0
    cls[1, num_classes] = 10.0  # query 1 is "no object"
    masks = torch.full((2, 4, 4), -5.0)
    masks[0, :2, :2] = 5.0  # top-left quarter of a 16x16 padded input
    out = mmdet_postprocess(cls, masks, valid_hw=(16, 16), image_hw=(16, 16), max_per_image=5)
    label, score, mask = out[0]
    assert OBJECT_NAMES[label] == "dog" and mask.shape == (16, 16)
    assert box_from_mask(mask) == (0.0, 0.0, 8.0, 8.0)
    p_dog = torch.softmax(cls[0], -1)[label].item()
    assert 0.5 * p_dog < score < p_dog  # class probability x mean mask probability
    assert all(s <= score for _, s, _ in out)
    assert box_from_mask(np.zeros((4, 4), bool)) == (0.0, 0.0, 0.0, 0.0)


def test_mmdet_postprocess_crops_padding_before_resizing_to_the_image():
    cls = torch.zeros(1, 81)
    cls[0, 0] = 10.0
    masks = torch.full((1, 4, 4), -5.0)
    masks[0, :, 2:] = 5.0  # positive only in the right half, which is padding
    (_, _, mask), *_ = mmdet_postprocess(cls, masks, valid_hw=(16, 8), image_hw=(32, 16), max_per_image=1)
    assert mask.shape == (32, 16) and not mask.any()


def _cv2_bilinear(arr, h, w):
    """cv2.resize INTER_LINEAR written out in numpy (half-pixel centres, border clamp, no antialias), uint8 out."""
    def taps(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = taps(h, arr.shape[0])
    x0, x1, fx = taps(w, arr.shape[1])
    a = arr.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.floor(out + 0.5), 0, 255)


def test_mmdet_preprocess_keeps_the_aspect_ratio_and_pads_a_640x480_image_to_800x1088():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    pixels, valid = MmdetPreprocess()(image)
    assert valid == (800, 1067) and tuple(pixels.shape) == (1, 3, 800, 1088)  # mmdet: 800x1067, padded to 1088
    assert pixels[..., 1067:].abs().max() == 0 and pixels[..., :1067].abs().sum(dim=(0, 1, 2)).min() > 0
    assert MmdetPreprocess().resized_hw(512, 512) == (800, 800)
    assert MmdetPreprocess().resized_hw(1024, 4096) == (333, 1333)  # the long edge caps the scale


@pytest.mark.parametrize("hw", [(30, 40), (480, 640)])  # down- and up-scaling
def test_mmdet_preprocess_resizes_as_cv2_bilinear_then_normalises(hw):
    pre = MmdetPreprocess(short_edge=8, long_edge=13) if hw[0] < 100 else MmdetPreprocess()
    arr = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    pixels, (h, w) = pre(Image.fromarray(arr))
    expected = _cv2_bilinear(arr, h, w)
    got = pixels[0, :, :h, :w].permute(1, 2, 0).double().numpy() * np.array(pre.std) + np.array(pre.mean)
    diff = np.abs(got - expected)
    assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 0.05  # rounding at .5: one grey level, rarely
    assert np.abs(got - np.round(got)).max() < 1e-3  # quantised to uint8 before Normalize, as mmcv does


def test_tiny_mask2former_end_to_end_returns_detections_per_geneval_name():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, num_queries=6, encoder_layers=1, decoder_layers=2,
                            num_labels=80, feature_size=32, mask_feature_size=32, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_attention_heads=2)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg)
    detector = Mask2FormerDetector(model, MmdetPreprocess(short_edge=64, long_edge=96), name="tiny-m2f")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    found = detector(image)
    dets = [d for v in found.values() for d in v]
    assert set(found) <= set(OBJECT_NAMES) and len(dets) == 100  # mmdet keeps the top 100 of 6 queries x 80 classes
    for d in dets:
        assert d.mask.shape == (40, 56) and 0.0 <= d.score <= 1.0
        assert 0 <= d.box[0] <= d.box[2] <= 56 and 0 <= d.box[1] <= d.box[3] <= 40


# ------------------------------------------------------------------ scoring a run folder

def test_geneval_dir_scores_a_run_and_writes_per_image_verdicts(tmp_path):
    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
              "prompt": "a photo of a red car"}]
    (tmp_path / "images").mkdir()
    rows = []
    for p, meta in enumerate(metas):
        for s in range(2):
            name = f"images/{p:05d}_{s:02d}.png"
            Image.new("RGB", (8, 8), (p * 100, s * 100, 0)).save(tmp_path / name)
            rows.append({"file": name, "prompt_idx": p, "sample_idx": s, "seed": 0, "prompt": meta["prompt"],
                         "meta": meta})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def detector(image):  # sample 0 of each prompt has a dog and a car; sample 1 nothing
        if image.getpixel((0, 0))[1] == 0:
            return {"dog": [Detection((0, 0, 4, 4), 0.8)], "car": [Detection((4, 4, 8, 8), 0.8)]}
        return {}

    result = geneval_dir(detector, lambda image, name, objs: ["red"] * len(objs), tmp_path)
    assert result.per_task == {"single_object": 0.5, "colors": 0.5} and result.overall == 0.5 and result.n_images == 4
    verdicts = [json.loads(line) for line in open(result.details)]
    assert [v["correct"] for v in verdicts] == [True, False, True, False]
