"""DreamSim: dense vs dense is exactly 1.0, pairs are checked, the package's side effects are contained."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eval import EvalError, MissingAssetError
from eval.backbones import efficientnet_perceptual
from eval.dreamsim import dreamsim_dir, load_dreamsim, missing_files, restored_hub_dir


def _run(folder, arrays, seeds=None):
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, arr in enumerate(arrays):
        name = f"images/{i:05d}_00.png"
        Image.fromarray(arr).save(folder / name)
        seed = seeds[i] if seeds else i
        rows.append({"file": name, "prompt_idx": i, "sample_idx": 0, "seed": seed, "prompt": f"p{i}"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def perceptual():
    return efficientnet_perceptual("cpu")


@pytest.fixture
def photos():
    import skimage.data

    return [np.asarray(Image.fromarray(a).resize((64, 64))) for a in (skimage.data.chelsea(), skimage.data.coffee(),
                                                                       skimage.data.astronaut())]


class _Counting:
    """Wrap a backbone and count the pairs it was asked about."""

    def __init__(self, inner):
        self.inner, self.name, self.pairs = inner, inner.name, 0

    def distance(self, a, b):
        self.pairs += len(a)
        return self.inner.distance(a, b)


def test_dense_against_itself_is_exactly_one(tmp_path, perceptual, photos):
    dense = _run(tmp_path / "dense", photos)
    assert dreamsim_dir(perceptual, dense, dense).value == 1.0
    # A byte-for-byte copy in another folder (a rerun of the dense cell): pixel-identical pairs skip the model.
    copy = tmp_path / "copy"
    shutil.copytree(dense, copy)
    counting = _Counting(perceptual)
    result = dreamsim_dir(counting, copy, dense)
    assert result.value == 1.0 and result.n_identical == 3 and counting.pairs == 0


@pytest.mark.parametrize("batch_size", [1, 2, 16])  # 16: the last partial batch must be flushed too
def test_changed_images_score_below_one_and_only_they_go_through_the_model(tmp_path, perceptual, photos, batch_size):
    dense = _run(tmp_path / "dense", photos)
    changed = [photos[0], photos[1][:, ::-1].copy(), np.roll(photos[2], 20, axis=0)]
    pruned = _run(tmp_path / "pruned", changed)
    counting = _Counting(perceptual)
    result = dreamsim_dir(counting, pruned, dense, batch_size=batch_size)
    assert counting.pairs == 2 and result.n_identical == 1
    d = perceptual.distance([Image.fromarray(changed[1]), Image.fromarray(changed[2])],
                            [Image.fromarray(photos[1]), Image.fromarray(photos[2])]).double().numpy()
    assert result.value == pytest.approx(float(np.mean([1.0, 1 - d[0], 1 - d[1]])), abs=1e-6)
    assert result.value < 1.0 and "NOT DreamSim" in result.backbone


def test_unpaired_runs_are_refused(tmp_path, perceptual, photos):
    dense = _run(tmp_path / "dense", photos)
    other = _run(tmp_path / "other", photos, seeds=[7, 8, 9])
    with pytest.raises(EvalError, match="not paired"):
        dreamsim_dir(perceptual, other, dense)


def test_load_dreamsim_offline_names_missing_files_and_leaves_hub_dir_alone(tmp_path, monkeypatch):
    before = torch.hub.get_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingAssetError, match="ensemble_lora/adapter_config.json") as err:
        load_dreamsim("cpu", cache_dir=tmp_path / "ds", dreamsim_type="ensemble", allow_download=True)
    assert "\n" not in str(err.value) and "dino_vitb16_pretrain.pth" in str(err.value)
    assert "dino_vitb16_pretrain.pth" in missing_files(tmp_path, "ensemble")
    assert torch.hub.get_dir() == before


def test_load_dreamsim_restores_the_hub_dir_that_the_package_sets(tmp_path, monkeypatch):
    # A stand-in for the dreamsim package that does what dreamsim 0.2.1 does: torch.hub.set_dir(cache_dir).
    import sys
    import types

    folder = tmp_path / "ds"
    for f in missing_files(folder, "open_clip_vitb32"):
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes(b"")
    calls = []

    def fake_dreamsim(pretrained, device, cache_dir, dreamsim_type):
        calls.append((pretrained, device, cache_dir, dreamsim_type))
        torch.hub.set_dir(cache_dir)
        return torch.nn.Identity(), lambda im: im

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=fake_dreamsim))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # every file is there: no download needed, none attempted
    before = torch.hub.get_dir()
    backbone = load_dreamsim("cpu", cache_dir=folder, dreamsim_type="open_clip_vitb32", allow_download=False)
    assert calls == [(True, "cpu", str(folder), "open_clip_vitb32")]
    assert torch.hub.get_dir() == before and backbone.name == "dreamsim-open_clip_vitb32"


def test_restored_hub_dir_undoes_a_global_set_dir(tmp_path):
    before = torch.hub.get_dir()
    with pytest.raises(RuntimeError):
        with restored_hub_dir():
            torch.hub.set_dir(str(tmp_path))
            assert torch.hub.get_dir() == str(tmp_path)
            raise RuntimeError("dreamsim failed half-way")
    assert torch.hub.get_dir() == before
