"""GenEval without mmdetection: the official decision rules over detections, colour by zero-shot CLIP (SPEC §5).

Rules (djghosh13/geneval ``evaluation/evaluate_images.py``, re-implemented, not copied):
- keep detections with score > 0.3 (> 0.9 for the ``counting`` tag), most confident first, at most 16 per
  class, no NMS;
- ``include`` clauses are ANDed: the class must have >= ``count`` kept detections; only its ``count`` most
  confident ones are checked further. ``color``: zero-shot CLIP over 10 colours must give the asked colour
  to >= ``count`` of them. ``position`` (relation, target clause index): every checked object must be in
  that relation to every object matched by the target clause;
- ``exclude`` clauses are ORed: the image fails if any class has >= ``count`` kept detections;
- per-task score = fraction of correct images of the tag; overall = unweighted mean of the 6 task scores.

Where this can differ from the official evaluator (also in docs/eval.md):
1. Detector weights: transformers' ``facebook/mask2former-swin-small-coco-instance`` (converted from the
   original Mask2Former release) instead of mmdet's own ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``
   checkpoint: same architecture and data, a different training run, so detections and scores differ.
2. Pre-processing: mmdet's test pipeline re-implemented (``MmdetPreprocess``): rescale keeping the aspect
   ratio so the short edge is <= 800 and the long edge <= 1333 (mmcv ``rescale_size``), bilinear without
   antialiasing on half-pixel centres as cv2 ``INTER_LINEAR``, rounded to uint8, ImageNet mean/std, zero
   pad at the bottom/right to a multiple of 32. cv2 works in 11-bit fixed point, we in float32: a pixel
   can differ by one grey level. transformers' Mask2Former processor is not used: with a size divisor it
   stretches the image to the padded size (640x480 -> 800x1088 instead of 800x1067 + padding).
3. Post-processing mirrors mmdet 2.x ``MaskFormerFusionHead`` (top-100 query x class pairs, masks
   upsampled bilinearly to the padded input, cropped, upsampled to the image, thresholded at logit 0,
   score x mean mask probability, boxes from masks); float round-off can flip borderline cases.
4. Colour CLIP: open_clip ``ViT-L-14-quickgelu`` with OpenAI weights. The official code asks for ``ViT-L-14``
   with ``pretrained="openai"``, which older open_clip built with QuickGELU; open_clip >= 2.29 does not.
5. We run fp32 on any device; the official script requires CUDA.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval import EvalError, MissingAssetError
from eval.generate import complete_manifest
from skrr.io import atomic_write_text

log = logging.getLogger(__name__)

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_SHRINK = 0.1
BACKGROUND = "#999"
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
# GenEval's object_names.txt: the 80 COCO classes in COCO order, with GenEval's spelling of three of them
# (computer mouse, tv remote, computer keyboard). Override with eval.geneval.object_names (a file path).
OBJECT_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, image y pointing down; score; optional bool mask."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


Detections = dict[str, list[Detection]]
ColorFn = Callable[[str, Sequence[Detection]], list[str]]  # (classname, objects) -> one colour per object


def keep_detections(raw: Mapping[str, Sequence[Detection]], tag: str) -> Detections:
    """Official filtering: score > 0.3 (> 0.9 for counting), most confident first, at most 16 per class."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, dets in raw.items():
        ordered = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if ordered:
            kept[name] = ordered
    return kept


def relative_position(a: Detection, b: Detection, shrink: float = POSITION_SHRINK) -> set[str]:
    """Relations of A to B: centre offset shrunk by 0.1 x (size A + size B) per axis, normalised, +-0.5 rule."""
    box_a, box_b = np.asarray(a.box, np.float64), np.asarray(b.box, np.float64)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    size_sum = np.abs(box_a[2:] - box_a[:2]) + np.abs(box_b[2:] - box_b[:2])
    revised = np.maximum(np.abs(offset) - shrink * size_sum, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")  # image y points down: smaller y is higher up
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate_rules(detections: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any],
                   color_fn: ColorFn | None = None) -> tuple[bool, str]:
    """Is the image correct under GenEval's rules? ``detections`` are already kept (``keep_detections``).

    ``color_fn(classname, objects)`` returns one colour name per object; it is called only for clauses with
    a ``color``. Returns (correct, reasons joined by newlines).
    """
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = list(detections.get(name, []))[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            if color_fn is None:
                raise EvalError("a colour clause needs a colour classifier; pass color_fn")
            colors = color_fn(name, found)
            if colors.count(req["color"]) < count:
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found colours {colors}")
        if ok and "position" in req:
            relation, target = req["position"][0], int(req["position"][1])
            targets = matched[target] if target < len(matched) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    bad = [t for t in targets if relation not in relative_position(obj, t)]
                    if bad:
                        ok = False
                        rels = " and ".join(sorted(relative_position(obj, bad[0]))) or "no relation"
                        reasons.append(f"expected {name} {relation} target, found {rels}")
                        break
        correct = correct and ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        if len(detections.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(detections[name])}")
    return correct, "\n".join(reasons)


def task_scores(results: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], float]:
    """Per-tag fraction correct and their unweighted mean (GenEval's overall score)."""
    by_tag: dict[str, list[bool]] = {}
    for r in results:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    per_task = {t: float(np.mean(v)) for t, v in by_tag.items()}
    ordered = {t: per_task[t] for t in TASKS if t in per_task} | {t: v for t, v in per_task.items() if t not in TASKS}
    return ordered, float(np.mean(list(ordered.values()))) if ordered else float("nan")


# ---------------------------------------------------------------- colour (zero-shot CLIP on grey-masked crops)

def masked_crop(image: Image.Image, det: Detection, background: str = BACKGROUND) -> Image.Image:
    """The object pasted on a flat grey image (mask) and cropped to its box (PIL rounds box coordinates)."""
    image = image.convert("RGB")
    if det.mask is not None:
        if tuple(det.mask.shape) != (image.height, image.width):
            raise EvalError(f"mask {det.mask.shape} does not match image {image.size[::-1]}")
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(np.asarray(det.mask, bool)))
    return image.crop(tuple(det.box))


class ClipColorClassifier:
    """Zero-shot colour of detected objects: 10 colours x 3 templates, class text embeddings averaged."""

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Any,
                 name: str, device: str | torch.device = "cpu") -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.name, self.device = name, torch.device(device)
        self._classifiers: dict[str, torch.Tensor] = {}

    @staticmethod
    def templates(classname: str) -> list[str]:
        """GenEval's three prompts per colour ({c} is the colour)."""
        return [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", "a photo of a {c} object"]

    @torch.inference_mode()
    def classifier(self, classname: str) -> torch.Tensor:
        """[d, 10] colour weights for ``classname`` (unit text embeddings averaged over templates, renormalised)."""
        if classname not in self._classifiers:
            columns = []
            for color in COLORS:
                tokens = self.tokenizer([t.format(c=color) for t in self.templates(classname)])
                emb = F.normalize(self.model.encode_text(_to(tokens, self.device)).float(), dim=-1).mean(dim=0)
                columns.append(F.normalize(emb, dim=-1))
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    @torch.inference_mode()
    def __call__(self, image: Image.Image, classname: str, objects: Sequence[Detection]) -> list[str]:
        """One colour name per object of ``image``."""
        batch = torch.stack([self.preprocess(masked_crop(image, d)) for d in objects]).to(self.device)
        feats = F.normalize(self.model.encode_image(batch).float(), dim=-1)
        return [COLORS[i] for i in (feats @ self.classifier(classname)).argmax(dim=1).tolist()]


def _to(tokens: Any, device: torch.device) -> Any:
    return tokens.to(device) if hasattr(tokens, "to") else tokens


def clip_color_classifier(arch: str = "ViT-L-14-quickgelu", pretrained: str = "openai",
                          device: str | torch.device = "cpu", cache_dir: str | None = None) -> ClipColorClassifier:
    """open_clip colour classifier; ``pretrained`` is ``openai`` (hub download) or a local weights file."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device,
                                                                     cache_dir=cache_dir)
    except Exception as err:  # open_clip raises RuntimeError/OSError/HF errors when weights cannot be fetched
        raise MissingAssetError(f"open_clip {arch} weights {pretrained!r} unavailable ({type(err).__name__}); "
                                f"set eval.geneval.color.pretrained to a local OpenAI ViT-L/14 file") from err
    return ClipColorClassifier(model.eval(), preprocess, open_clip.get_tokenizer(arch),
                               name=f"open_clip {arch} ({pretrained})", device=device)


# ---------------------------------------------------------------- detection (transformers Mask2Former, mmdet-style)

def mmdet_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, valid_hw: tuple[int, int],
                      image_hw: tuple[int, int], max_per_image: int = 100) -> list[tuple[int, float, np.ndarray]]:
    """mmdet 2.x Mask2Former instance results for one image: [(label, score, bool mask [H, W])], threshold 0.

    ``class_logits`` [Q, C+1] (last = no object); ``mask_logits`` [Q, h, w] at 1/4 of the padded input;
    ``valid_hw`` the resized image inside the padding; ``image_hw`` the original image.
    """
    num_classes = class_logits.shape[-1] - 1
    pad_hw = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    masks = F.interpolate(mask_logits[None].float(), size=pad_hw, mode="bilinear", align_corners=False)
    masks = masks[..., :valid_hw[0], :valid_hw[1]]
    masks = F.interpolate(masks, size=image_hw, mode="bilinear", align_corners=False)[0]
    scores = class_logits.float().softmax(-1)[:, :num_classes]
    top, idx = scores.flatten().topk(min(max_per_image, scores.numel()), sorted=True)
    labels, queries = idx % num_classes, idx // num_classes
    masks = masks[queries]
    binary = masks > 0
    mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = top * mask_score
    return [(int(lab), float(s), m.cpu().numpy()) for lab, s, m in zip(labels, det_scores, binary)]


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mmdet's mask2bbox: (x_min, y_min, x_max + 1, y_max + 1); all zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


@dataclass(frozen=True)
class MmdetPreprocess:
    """mmdet 2.x test pipeline for Mask2Former: Resize(keep_ratio, (1333, 800)), Normalize, Pad(size_divisor=32)."""

    short_edge: int = 800
    long_edge: int = 1333
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # ImageNet mean/std x 255, RGB
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """mmcv ``rescale_size``: one scale factor for both axes, each side rounded half up."""
        scale = min(self.long_edge / max(height, width), self.short_edge / min(height, width))
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB image -> (pixel values [1, 3, H_pad, W_pad], (h, w) of the resized image inside the padding)."""
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        h, w = self.resized_hw(arr.shape[0], arr.shape[1])
        # cv2 INTER_LINEAR: src = (dst + 0.5) * scale - 0.5, clamped at the border, no antialiasing on
        # downscale, and a uint8 result (mmcv resizes the uint8 image before Normalize makes it float).
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        x = x.round().clamp(0, 255)
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        d = self.size_divisor
        x = F.pad(x, (0, -w % d, 0, -h % d))  # mmdet pads after Normalize, with 0, at the bottom and right
        return x, (h, w)


class Mask2FormerDetector:
    """transformers ``Mask2FormerForUniversalSegmentation`` -> ``{class name: [Detection]}`` with every score."""

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], tuple[torch.Tensor, tuple[int, int]]],
                 name: str, device: str | torch.device = "cpu", class_names: Sequence[str] = OBJECT_NAMES) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.name, self.device = preprocess, name, torch.device(device)
        if model.config.num_labels != len(class_names):
            raise EvalError(f"detector has {model.config.num_labels} labels, GenEval names {len(class_names)}; "
                            f"use a COCO-instance (80 class) checkpoint")
        self.class_names = list(class_names)

    @classmethod
    def from_pretrained(cls, model_id: str = "facebook/mask2former-swin-small-coco-instance",
                        device: str | torch.device = "cpu", class_names: Sequence[str] = OBJECT_NAMES,
                        cache_dir: str | None = None) -> Mask2FormerDetector:
        """Load from the hub or a local folder; the pre-processing is mmdet's test pipeline (``MmdetPreprocess``)."""
        from transformers import Mask2FormerForUniversalSegmentation

        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(model_id, cache_dir=cache_dir)
        except OSError as err:
            raise MissingAssetError(f"Mask2Former {model_id!r} is not available (offline or not cached); download it "
                                    f"once or set eval.geneval.detector.model_id to a local folder") from err
        return cls(model, MmdetPreprocess(), name=model_id, device=device, class_names=class_names)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Detections:
        """All instance detections of one image (no threshold; GenEval thresholds them itself)."""
        image = image.convert("RGB")
        pixels, valid_hw = self.preprocess(image)
        # mmdet 2.x's Mask2FormerHead ignores the padding (no pixel mask), so none is passed here either.
        out = self.model(pixel_values=pixels.to(self.device))
        found: Detections = {}
        for label, score, m in mmdet_postprocess(out.class_queries_logits[0], out.masks_queries_logits[0],
                                                 valid_hw, (image.height, image.width)):
            found.setdefault(self.class_names[label], []).append(Detection(box_from_mask(m), score, m))
        return found


def mask2former_detector(model_id: str = "facebook/mask2former-swin-small-coco-instance",
                         device: str | torch.device = "cpu", object_names: str | Path | None = None,
                         cache_dir: str | None = None) -> Mask2FormerDetector:
    """Config entry point (``_target_``) for the GenEval detector."""
    return Mask2FormerDetector.from_pretrained(model_id, device=device, class_names=load_object_names(object_names),
                                               cache_dir=cache_dir)


def load_object_names(path: str | Path | None) -> list[str]:
    """GenEval's 80 class names: from a file (one per line, e.g. geneval's object_names.txt) or the built-in list."""
    if path is None:
        return list(OBJECT_NAMES)
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingAssetError(f"object names file {p} not found; use GenEval's evaluation/object_names.txt "
                                f"or unset eval.geneval.detector.object_names")
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


# ---------------------------------------------------------------- scoring a run

@dataclass(frozen=True)
class GenEvalResult:
    """Per-task fractions correct, their mean, and the models that produced them."""

    overall: float
    per_task: dict[str, float]
    n_images: int
    backbone: str
    details: str


def geneval_dir(detector: Callable[[Image.Image], Detections],
                color: Callable[[Image.Image, str, Sequence[Detection]], list[str]],
                images_dir: str | Path, details_path: str | Path | None = None) -> GenEvalResult:
    """Score every image of a GenEval run (manifest rows carry the prompt's metadata).

    ``detector(image)`` gives all detections by class name; ``color(image, classname, objects)`` one colour
    per object (``ClipColorClassifier``). Per-image verdicts go to ``details_path`` (JSONL, like GenEval's).
    """
    images_dir = Path(images_dir)
    rows = complete_manifest(images_dir)
    if any("meta" not in r or "tag" not in r["meta"] for r in rows):
        raise EvalError(f"{images_dir} was not generated from GenEval metadata; generate the geneval prompt set")
    names = set(getattr(detector, "class_names", OBJECT_NAMES))
    unknown = {c["class"] for r in rows for c in r["meta"].get("include", []) + r["meta"].get("exclude", [])} - names
    if unknown:
        raise EvalError(f"GenEval classes {sorted(unknown)} are not among the detector's names; "
                        f"set eval.geneval.detector.object_names to GenEval's object_names.txt")
    results = []
    for r in rows:
        image = Image.open(images_dir / r["file"]).convert("RGB")
        kept = keep_detections(detector(image), r["meta"]["tag"])
        ok, reason = evaluate_rules(kept, r["meta"], lambda name, objs, im=image: color(im, name, objs))
        boxes = {k: [list(d.box) + [d.score] for d in v] for k, v in kept.items()}
        results.append({"file": r["file"], "tag": r["meta"]["tag"], "prompt": r["prompt"], "correct": ok,
                        "reason": reason, "details": boxes})
    per_task, overall = task_scores(results)
    details = Path(details_path) if details_path else images_dir / "geneval_results.jsonl"
    atomic_write_text(details, "".join(json.dumps(x) + "\n" for x in results))
    backbone = f"{getattr(detector, 'name', type(detector).__name__)} + {getattr(color, 'name', 'colour fn')}"
    log.info("GenEval overall %.4f over %d images (%s)", overall, len(results), per_task)
    return GenEvalResult(overall, per_task, len(results), backbone, str(details))
