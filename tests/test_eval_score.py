"""Eval configs compose as a Hydra multi-select; the offline preset scores a tiny dense and a tiny 'pruned' run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eval import EvalError
from eval.score import ScoreContext, generate_all, metric_specs, prompt_sets, score_all, settings_from_config

EVAL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
REAL = ["fid", "clip", "dreamsim", "geneval", "cost"]


@pytest.fixture
def config_dir(tmp_path):
    """Our eval group under a minimal primary config (the project's config.yaml is tested with run.py)."""
    root = tmp_path / "configs"
    shutil.copytree(EVAL_CONFIGS, root / "eval")
    (root / "config.yaml").write_text(
        "defaults:\n  - eval: none\n  - _self_\n"
        f"paths: {{data: {tmp_path / 'data'}, cache: {tmp_path / 'cache'}}}\ndevice: cpu\n")
    return root


def _compose(config_dir, *overrides):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_multi_select_lands_each_metric_under_its_own_key(config_dir, tmp_path):
    cfg = _compose(config_dir, f"eval=[{','.join(REAL)}]")
    assert list(cfg.eval) == REAL
    assert cfg.eval.fid.mode == "clean" and cfg.eval.fid.backbone._target_ == "eval.fid.inception"
    assert cfg.eval.clip.backbone.model_id == "openai/clip-vit-base-patch32"
    assert cfg.eval.dreamsim.backbone.dreamsim_type == "ensemble"
    assert cfg.eval.geneval.color.arch == "ViT-L-14-quickgelu" and cfg.eval.geneval.prompts.samples_per_prompt == 4
    assert cfg.eval.clip.prompts.path == str(tmp_path / "data" / "coco" / "annotations" / "captions_val2014.json")
    assert set(prompt_sets(cfg.eval)) == {"coco30k", "geneval"}  # fid, clip and dreamsim share one set
    assert {k: s["metric"] for k, s in metric_specs(cfg.eval).items()} == dict(zip(REAL, REAL))


def test_default_is_no_metrics_and_ablation_files_use_the_nested_1k_subset(config_dir):
    assert OmegaConf.to_container(_compose(config_dir).eval) == {}
    cfg = _compose(config_dir, "eval=[clip1k,dreamsim1k,geneval]")
    assert cfg.eval.clip1k.metric == "clip" and cfg.eval.clip1k.prompts.n == 1000
    assert set(prompt_sets(cfg.eval)) == {"coco1k", "geneval"}


def test_every_real_backbone_target_resolves_to_a_callable(config_dir):
    from hydra.utils import get_method

    cfg = _compose(config_dir, f"eval=[{','.join(REAL)}]")
    targets = [cfg.eval[k].backbone._target_ for k in ("fid", "clip", "dreamsim")]
    targets += [cfg.eval.geneval.detector._target_, cfg.eval.geneval.color._target_]
    assert all(callable(get_method(t)) for t in targets)


def test_prompt_sets_with_one_name_must_agree(config_dir):
    cfg = _compose(config_dir, "eval=[clip,dreamsim]", "eval.dreamsim.prompts.seed=1")
    with pytest.raises(EvalError, match="coco30k"):
        prompt_sets(cfg.eval)


def test_settings_from_pipeline_config():
    s = settings_from_config({"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 4.5,
                              "batch_size": 8}, {"use_resolution_binning": False}, seed=3)
    assert s.height == 64 and s.seed == 3 and s.call_kwargs == {"use_resolution_binning": False}
    with pytest.raises(EvalError, match="steps"):
        settings_from_config({"steps": 20})


def test_offline_preset_scores_dense_and_pruned_runs_end_to_end(config_dir, tmp_path):
    from skrr.pipelines import build_tiny_pipeline

    # 8 prompts x 1 image keeps the EfficientNet passes short on CPU; the three metrics share the set.
    small = [f"++eval.{k}.prompts.{f}" for k in ("fid", "clip", "dreamsim") for f in ("n=8", "samples_per_prompt=1")]
    cfg = _compose(config_dir, "eval=offline", *small)
    assert list(cfg.eval) == ["fid", "clip", "dreamsim", "cost"]
    gen = settings_from_config({"height": 16, "width": 16, "num_inference_steps": 2, "guidance_scale": 4.5,
                                "batch_size": 16}, {"use_resolution_binning": False, "max_sequence_length": 16})
    dense_pipe, pruned_pipe = build_tiny_pipeline("t5", seed=0), build_tiny_pipeline("t5", seed=1)
    dense_root, pruned_root = tmp_path / "dense" / "images", tmp_path / "pruned" / "images"
    made = generate_all(cfg.eval, dense_pipe, dense_root, gen, extra={"cell": "dense"}, progress=False)
    assert list(made) == ["tiny"] and made["tiny"].n_images == 8
    generate_all(cfg.eval, pruned_pipe, pruned_root, gen, extra={"cell": "pruned"}, progress=False)

    dense = score_all(cfg.eval, dense_root, dense_root, tmp_path / "dense" / "metrics",
                      ScoreContext(device="cpu", target_sparsity=0.0, realized_sparsity=0.0, pipeline=dense_pipe,
                                   settings=gen, info={"method": "dense"}))
    pruned = score_all(cfg.eval, pruned_root, dense_root, tmp_path / "pruned" / "metrics",
                       ScoreContext(device="cpu", target_sparsity=0.4, realized_sparsity=0.41, pipeline=pruned_pipe,
                                    settings=gen, info={"method": "test"}))
    d = {k: json.loads(p.read_text()) for k, p in dense.items()}
    p = {k: json.loads(v.read_text()) for k, v in pruned.items()}
    assert d["dreamsim"]["value"] == 1.0 and p["dreamsim"]["value"] < 1.0
    assert d["fid"]["value"] == 0.0 and p["fid"]["value"] > 1e-3
    assert "NOT Inception" in p["fid"]["backbone"] and "NOT DreamSim" in p["dreamsim"]["backbone"]
    assert "random weights" in p["clip"]["backbone"] and -1.0 <= p["clip"]["value"] <= 1.0
    assert p["cost"]["params"]["total"] > 0 and p["cost"]["value"] == p["cost"]["tflops"] > 0
    for record in p.values():
        assert record["realized_sparsity"] == 0.41 and record["info"] == {"method": "test"}
        assert record["versions"]["clean-fid"] == "0.1.35" and record["elapsed_s"] >= 0
    assert p["clip"]["n_images"] == 8 and p["clip"]["prompt_set"]["name"] == "tiny"
    assert p["fid"]["mode"] == "clean"

    # A second call keeps existing files (no recomputation).
    mtimes = {k: v.stat().st_mtime_ns for k, v in pruned.items()}
    score_all(cfg.eval, pruned_root, dense_root, tmp_path / "pruned" / "metrics", ScoreContext(pipeline=pruned_pipe))
    assert {k: v.stat().st_mtime_ns for k, v in pruned.items()} == mtimes
