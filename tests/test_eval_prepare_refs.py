"""scripts/prepare_refs.py: the FID references are exactly the COCO-30k draw's images, centre-cropped and resized."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import MissingAssetError
from eval.prompts import load_coco_captions

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_refs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_refs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coco(tmp_path, n_images=12):
    (tmp_path / "val2014").mkdir()
    images, anns = [], []
    for i in range(n_images):
        image_id = 500 + i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        arr = np.zeros((40, 60, 3), np.uint8)
        arr[:, :10] = (255, 0, 0)  # red and blue side bands that a centre crop removes
        arr[:, 50:] = (0, 0, 255)
        arr[:, 10:50] = (0, 200, 0)
        Image.fromarray(arr).save(tmp_path / "val2014" / name, quality=100)
        images.append({"id": image_id, "file_name": name})
        anns.append({"image_id": image_id, "id": i, "caption": f"picture {i}"})
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))


def test_references_match_the_caption_draw_and_are_centre_cropped(tmp_path):
    _coco(tmp_path)
    prep = _load_script()
    written = prep.prepare_refs(tmp_path / "captions_val2014.json", tmp_path / "val2014", tmp_path / "refs",
                                n=5, seed=0, size=16, workers=1)
    ids = [m["image_id"] for m in load_coco_captions(tmp_path / "captions_val2014.json", n=5, seed=0).metadata]
    assert written == 5
    assert sorted(p.name for p in (tmp_path / "refs").iterdir()) == sorted(f"{i:012d}.png" for i in ids)
    arr = np.asarray(Image.open(tmp_path / "refs" / f"{ids[0]:012d}.png")).astype(int)
    assert arr.shape == (16, 16, 3)
    assert arr[..., 0].max() < 40 and arr[..., 2].max() < 40 and arr[..., 1].min() > 150  # only the green middle
    # A rerun writes nothing new.
    assert prep.prepare_refs(tmp_path / "captions_val2014.json", tmp_path / "val2014", tmp_path / "refs",
                             n=5, seed=0, size=16, workers=1) == 0


def test_missing_image_folder_is_one_clear_line(tmp_path):
    _coco(tmp_path, n_images=3)
    with pytest.raises(MissingAssetError, match="val2014") as err:
        _load_script().prepare_refs(tmp_path / "captions_val2014.json", tmp_path / "nope", tmp_path / "refs", n=2)
    assert "\n" not in str(err.value)
