"""Generation: resumes without regenerating, pairs images across runs by seed; prompt sets load or fail clearly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from eval import EvalError, MissingAssetError
from eval.generate import (GenerationSettings, export_geneval_layout, generate_images, image_seed, plan_images,
                           read_manifest)
from eval.prompts import (GENEVAL_URL, PromptSet, load_coco_captions, load_geneval_metadata, load_prompt_set,
                          tiny_prompts)

SETTINGS = GenerationSettings(height=16, width=16, num_inference_steps=2, guidance_scale=4.5, batch_size=3,
                              samples_per_prompt=2, seed=0,
                              call_kwargs={"use_resolution_binning": False, "max_sequence_length": 16})


def tiny_pipeline(seed: int = 0):
    from skrr.pipelines import build_tiny_pipeline

    return build_tiny_pipeline("t5", seed=seed)


class CountingPipeline:
    """Wrap a pipeline and count the images it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def __call__(self, **kw):
        self.images += len(kw["prompt"])
        return self.pipe(**kw)

    def to(self, device):
        self.pipe.to(device)
        return self


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture
def prompts():
    return tiny_prompts().subset(4)


def _pixels(folder, name):
    return np.asarray(Image.open(folder / name)).astype(int)


def test_layout_and_manifest(tmp_path, pipe, prompts):
    result = generate_images(pipe, prompts, tmp_path, SETTINGS, progress=False)
    rows = read_manifest(tmp_path)
    assert result.n_images == result.n_generated == 8 == len(rows)
    assert [r["file"] for r in rows[:3]] == ["images/00000_00.png", "images/00000_01.png", "images/00001_00.png"]
    assert all((tmp_path / r["file"]).is_file() for r in rows)
    assert rows[2]["prompt"] == prompts.prompts[1] and rows[2]["seed"] == image_seed(0, 1, 0)
    assert Image.open(tmp_path / rows[0]["file"]).size == (16, 16)
    assert not [f for f in os.listdir(tmp_path / "images") if not f.endswith(".png")]  # no temp files left


def test_rerun_generates_only_missing_images(tmp_path, pipe, prompts):
    generate_images(pipe, prompts, tmp_path, SETTINGS, progress=False)
    kept = tmp_path / "images" / "00000_00.png"
    mtime = kept.stat().st_mtime_ns
    (tmp_path / "images" / "00002_01.png").unlink()
    (tmp_path / "images" / "00003_00.png").unlink()
    counting = CountingPipeline(pipe)
    result = generate_images(counting, prompts, tmp_path, SETTINGS, progress=False)
    assert counting.images == 2 and result.n_generated == 2
    assert kept.stat().st_mtime_ns == mtime
    again = CountingPipeline(pipe)
    assert generate_images(again, prompts, tmp_path, SETTINGS, progress=False).n_generated == 0 and again.images == 0


def test_regenerated_image_equals_the_original(tmp_path, pipe, prompts):
    generate_images(pipe, prompts, tmp_path, SETTINGS, progress=False)
    before = _pixels(tmp_path, "images/00002_01.png")
    (tmp_path / "images" / "00002_01.png").unlink()
    generate_images(pipe, prompts, tmp_path, SETTINGS, progress=False)  # made again, in a batch of one
    assert np.abs(_pixels(tmp_path, "images/00002_01.png") - before).max() <= 1


def test_two_runs_with_the_same_seed_are_paired_image_for_image(tmp_path, pipe, prompts):
    generate_images(pipe, prompts, tmp_path / "a", SETTINGS, progress=False)
    other_batching = GenerationSettings(**{**SETTINGS.__dict__, "batch_size": 1})
    generate_images(pipe, prompts, tmp_path / "b", other_batching, progress=False)
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")
    for r in read_manifest(tmp_path / "a"):
        # Per-image CPU generators: batch composition changes only float round-off.
        assert np.abs(_pixels(tmp_path / "a", r["file"]) - _pixels(tmp_path / "b", r["file"])).max() <= 1
    # Different samples and different seeds give different images.
    first = _pixels(tmp_path / "a", "images/00000_00.png")
    assert np.abs(first - _pixels(tmp_path / "a", "images/00000_01.png")).max() > 10
    reseeded = GenerationSettings(**{**SETTINGS.__dict__, "seed": 1})
    generate_images(pipe, prompts, tmp_path / "c", reseeded, progress=False)
    assert np.abs(first - _pixels(tmp_path / "c", "images/00000_00.png")).max() > 10


def test_seeds_are_distinct_per_prompt_and_sample_and_stable():
    seeds = [r.seed for r in plan_images(tiny_prompts(), GenerationSettings(samples_per_prompt=4))]
    assert len(set(seeds)) == len(seeds) == 64
    assert image_seed(0, 3, 1) == image_seed(0, 3, 1) != image_seed(1, 3, 1)
    assert 0 <= image_seed(5, 0, 0) < 2**63


def test_folder_made_with_other_settings_is_refused_unless_overwrite(tmp_path, pipe, prompts):
    generate_images(pipe, prompts, tmp_path, SETTINGS, extra={"plan": "abc"}, progress=False)
    with pytest.raises(EvalError, match="extra"):
        generate_images(pipe, prompts, tmp_path, SETTINGS, extra={"plan": "def"}, progress=False)
    steps = GenerationSettings(**{**SETTINGS.__dict__, "num_inference_steps": 3})
    with pytest.raises(EvalError, match="settings"):
        generate_images(pipe, prompts, tmp_path, steps, extra={"plan": "abc"}, progress=False)
    counting = CountingPipeline(pipe)
    generate_images(counting, prompts, tmp_path, steps, extra={"plan": "abc"}, overwrite=True, progress=False)
    assert counting.images == 8
    # Batch size is not part of a run's identity: changing it reuses the images.
    bigger = GenerationSettings(**{**steps.__dict__, "batch_size": 8})
    assert generate_images(pipe, prompts, tmp_path, bigger, extra={"plan": "abc"}, progress=False).n_generated == 0


def test_geneval_export_matches_the_official_layout(tmp_path, pipe):
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
    ps = PromptSet("geneval", [meta["prompt"]], [meta])
    generate_images(pipe, ps, tmp_path / "run", GenerationSettings(**{**SETTINGS.__dict__, "samples_per_prompt": 2}),
                    progress=False)
    assert read_manifest(tmp_path / "run")[0]["meta"] == meta
    dest = export_geneval_layout(tmp_path / "run", tmp_path / "official")
    assert json.loads((dest / "00000" / "metadata.jsonl").read_text()) == meta
    assert sorted(os.listdir(dest / "00000" / "samples")) == ["0000.png", "0001.png"]


# ------------------------------------------------------------------ prompt sets

def _coco_json(path, n_images=50):
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    anns = [{"image_id": 1000 + i, "id": 10 * i + k, "caption": f" image {i}\ncaption {k} "}
            for i in range(n_images) for k in range(5)]
    path.write_text(json.dumps({"images": images, "annotations": anns[::-1]}))  # file order must not matter
    return path


def test_coco_draw_is_seeded_one_caption_per_image_and_subsets_are_nested(tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json")
    a = load_coco_captions(path, n=30, seed=0)
    assert a.prompts == load_coco_captions(path, n=30, seed=0).prompts
    assert a.prompts != load_coco_captions(path, n=30, seed=1).prompts
    ids = [m["image_id"] for m in a.metadata]
    assert len(set(ids)) == 30 and all("\n" not in p and p == p.strip() for p in a.prompts)
    assert all(p.startswith(f"image {i - 1000} caption") for p, i in zip(a.prompts, ids))
    small = load_prompt_set({"kind": "coco", "path": str(path), "draw": 30, "n": 10, "seed": 0, "name": "coco10"})
    assert small.prompts == a.prompts[:10] and small.name == "coco10"
    # The same captions stored in another order draw the same prompts (ids and captions are sorted first).
    data = json.loads(path.read_text())
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps({"images": data["images"][::-1], "annotations": data["annotations"][::-1]}))
    assert load_coco_captions(shuffled, n=30, seed=0).prompts == a.prompts


def test_geneval_metadata_loads_prompts_and_rules(tmp_path):
    rows = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
             "prompt": "a photo of two cats"}, {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                                                "prompt": "a photo of a dog"}]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_geneval_metadata(path)
    assert ps.prompts == ["a photo of two cats", "a photo of a dog"] and ps.meta(0)["exclude"][0]["count"] == 3


@pytest.mark.parametrize("loader, needle", [(load_coco_captions, "captions_val2014.json"),
                                            (load_geneval_metadata, "evaluation_metadata.jsonl")])
def test_missing_prompt_files_raise_one_line_naming_the_file_and_where_to_get_it(tmp_path, loader, needle):
    with pytest.raises(MissingAssetError) as err:
        loader(tmp_path / "nowhere.json")
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and str(tmp_path / "nowhere.json") in msg
    if needle.startswith("evaluation"):
        assert GENEVAL_URL in msg
    with pytest.raises(MissingAssetError, match="no path given"):
        loader(None)


def test_tiny_prompts_ship_with_the_package():
    ps = tiny_prompts()
    assert len(ps) == 16 and len(set(ps.prompts)) == 16 and ps.digest() == tiny_prompts().digest()
