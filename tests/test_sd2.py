"""The SD2 study (arXiv 2411.15113): tiny_sd2 encodes as diffusers' StableDiffusionPipeline, the U-Net is pruned
by magnitude (layer-wise / global) and by Wanda on real denoising activations, the sparsity arithmetic, run.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from baselines import prune_denoiser, prune_encoder
from baselines.magnitude import Magnitude, denoiser_weights, prune_denoiser_, prunable_weights
from baselines.wanda import Wanda, wanda_mask
from skrr.calib import CalibrationSet
from skrr.pipelines import PipelineSpec, build_tiny_sd2_pipeline, load_caption_projection, tiny_sd2_text_encoder
from skrr.plan import PlanError
from skrr.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]
SPEC = PipelineSpec(name="tiny_sd2", kind="tiny_sd2", dtype="float32", max_sequence_length=77)
PROMPTS = ["a red cat on a sofa", "", "a very long prompt " * 20, "two dogs playing"]


def test_sd2_features_are_what_the_unet_receives():
    """CalibrationSet's dense features (and generation's encoding) equal encode_prompt's output, which the U-Net's
    cross-attention reads directly (no projection), for a prompt longer than 77 tokens and an empty one."""
    pipe = build_tiny_sd2_pipeline()
    want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.allclose(SPEC.encoding.encode(pipe.text_encoder, pipe.tokenizer, PROMPTS), want, atol=1e-6)
    calib = CalibrationSet(pipe.text_encoder, pipe.tokenizer, PROMPTS, load_caption_projection(SPEC),
                           encoding=SPEC.encoding, null_prompt=False, batch_size=4)
    assert torch.allclose(calib.dense[0].float(), want, atol=1e-6)
    assert SPEC.encoding.call_kwargs() == {}  # StableDiffusionPipeline.__call__ takes no max_sequence_length


def _planted_unet():
    unet = tiny_unet(32)
    named = denoiser_weights(unet)
    name, planted = named[len(named) // 2]
    with torch.no_grad():
        planted.zero_()  # a dead layer: the smallest magnitudes of the U-Net
    return unet, named, name, planted


def test_planted_small_unet_layer_is_pruned_first_globally_not_layerwise():
    unet, named, name, planted = _planted_unet()
    frac = planted.numel() / sum(w.numel() for _, w in named)
    report = prune_denoiser_(unet, 2 * frac, "global")
    # global: the dead layer is the first half of the budget; the rest goes to the smallest |w| elsewhere
    assert report["num_zeroed"] == 2 * planted.numel()
    threshold = report["threshold"]
    assert all(bool((w[w != 0].abs() >= threshold).all()) for n, w in named)  # one threshold for all layers

    zeros_elsewhere = sum(int((w == 0).sum()) for n, w in named if n != name)
    assert zeros_elsewhere == planted.numel()  # the dead layer counted in the budget, not re-spent on others

    unet, named, name, planted = _planted_unet()
    before = {n: w.detach().clone() for n, w in named}
    prune_denoiser_(unet, 2 * frac, "layerwise")  # the same fraction of every matrix: the dead layer gains nothing
    for n, w in named:
        new = int((w == 0).sum()) - int((before[n] == 0).sum())
        if n == name:
            assert new == 0
        else:
            assert abs(int((w == 0).sum()) / w.numel() - 2 * frac) <= 1.5 / w.numel() + 1e-9, n


def test_denoiser_sparsity_is_reported_both_ways_and_convs_only_when_asked():
    unet = tiny_unet(32)
    convs = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
    report = prune_denoiser_(unet, 0.35, "layerwise", "linear")
    assert all(int((w == 0).sum()) == 0 for w in convs)  # the study's code prunes nn.Linear only
    linear = sum(w.numel() for _, w in denoiser_weights(unet))
    total = sum(p.numel() for p in unet.parameters())
    assert report["num_zeroed"] == round(0.35 * linear)
    assert report["paper_sparsity"] == pytest.approx(0.35, abs=1 / linear)
    assert report["fraction_of_all_params"] == pytest.approx(round(0.35 * linear) / total)
    assert report["storage"]["dense_bytes"] == 4 * total
    unet = tiny_unet(32)
    convs = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
    both = prune_denoiser_(unet, 0.35, "layerwise", "linear_conv")
    assert all(int((w == 0).sum()) > 0 for w in convs) and both["prunable_params"] > linear


def test_sd2_study_sparsity_arithmetic_from_the_real_architectures():
    """38.5 % overall = the component sparsities weighted by all parameters of text encoder and U-Net (SD2
    OpenCLIP ViT-H text + SD 2.1 U-Net, built on the meta device); under the study's Linear-only rule the zeroed
    weights are 20.1 % of those parameters."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, vocab_size=49408, max_position_embeddings=77,
                                          hidden_act="gelu", projection_dim=512))
        unet = UNet2DConditionModel(
            sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            use_linear_projection=True)
    t, u = sum(p.numel() for p in te.parameters()), sum(p.numel() for p in unet.parameters())
    assert (t, u) == (340_387_840, 865_910_724)
    assert round(100 * (0.475 * t + 0.35 * u) / (t + u), 1) == 38.5
    tp = sum(w.numel() for _, w in prunable_weights(te))
    up = sum(w.numel() for _, w in denoiser_weights(unet))
    assert round(100 * (0.475 * tp + 0.35 * up) / (t + u), 1) == 20.1


def test_magnitude_sparsity_of_prunable_is_the_studys_definition():
    pipe = build_tiny_sd2_pipeline()
    calib = CalibrationSet(pipe.text_encoder, pipe.tokenizer, [""], None, encoding=SPEC.encoding,
                           use_projection=False, null_prompt=False)
    plan = Magnitude(sparsity_of="prunable", denoiser_sparsity=0.35).search(calib, 0.475)
    rule = plan.meta["magnitude"]
    assert rule["paper_sparsity"] == pytest.approx(0.475, abs=1 / rule["prunable_params"])
    assert plan.meta["realized_sparsity"] == rule["num_zeroed"] / rule["total_params"] < 0.1  # embedding dominates
    assert plan.meta["denoiser"] == {"method": "magnitude", "sparsity": 0.35, "scope": "layerwise", "weights": "linear"}
    with pytest.raises(ValueError, match="denoiser_weights"):
        Magnitude(denoiser_weights="conv")


def test_wanda_zeros_the_inputs_the_calibration_never_activates():
    """Wanda's score |w|*||x_j||: a column with large weights but zero input goes first (magnitude keeps it)."""
    w = torch.randn(6, 8) * 0.1
    w[:, 3] = 5.0
    norms = torch.ones(8)
    norms[3] = 0.0
    mask = wanda_mask(w, norms, 0.25)
    assert mask[:, 3].all() and int(mask.sum()) == 6 * 2  # int(8 * 0.25) per output row


def test_wanda_plan_applies_to_the_same_weights_only():
    pipe = build_tiny_sd2_pipeline()
    calib = CalibrationSet(pipe.text_encoder, pipe.tokenizer, PROMPTS, load_caption_projection(SPEC),
                           encoding=SPEC.encoding, batch_size=4)
    plan = Wanda().search(calib, 0.5)
    encoder, _ = tiny_sd2_text_encoder()
    pruned = prune_encoder(encoder, plan)
    zeros = sum(int((w == 0).sum()) for _, w in prunable_weights(pruned))
    assert zeros == plan.meta["wanda"]["num_zeroed"] == sum(w.numel() for _, w in prunable_weights(pruned)) // 2
    with pytest.raises(PlanError, match="search again"):
        prune_encoder(pruned, plan)  # already pruned: other weights


def test_wanda_denoiser_reads_real_denoising_activations():
    """A text feature that the (dense) encoder always outputs as 0 feeds every attn2.to_k/to_v column j: Wanda,
    calibrated by running the pipeline, zeroes that column in every row even though its weights are the largest."""
    pipe = build_tiny_sd2_pipeline()
    j = 5
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.weight[j] = 0.0
        pipe.text_encoder.final_layer_norm.bias[j] = 0.0
        cross = [m for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
        for m in cross:
            m.weight[:, j] = 10.0
    plan = Wanda(denoiser_sparsity=0.1, denoiser_calib_prompts=2).search(
        CalibrationSet(pipe.text_encoder, pipe.tokenizer, PROMPTS, None, encoding=SPEC.encoding,
                       use_projection=False, batch_size=4), 0.0)
    report = prune_denoiser(pipe, pipe.unet, plan, {"height": 32, "width": 32, "num_inference_steps": 2})
    assert report["method"] == "wanda" and report["calib_prompts"] == 2
    assert cross and all(bool((m.weight[:, j] == 0).all()) for m in cross)
    assert report["paper_sparsity"] == pytest.approx(0.1, abs=0.05)


def test_run_py_prunes_tiny_sd2_text_encoder_and_unet(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path}", "logger=none", "pipeline=tiny_sd2",
         "method=magnitude", "method.sparsity_of=prunable", "sparsity=0.475", "method.denoiser_sparsity=0.35",
         "eval=offline", "~eval.fid", "~eval.dreamsim", "~eval.cost", "eval.clip.prompts.samples_per_prompt=1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = tmp_path / "runs/tiny_sd2/magnitude/s0.475/seed0"
    report = json.loads((cell / "denoiser.json").read_text())
    assert report["paper_sparsity"] == pytest.approx(0.35, abs=1e-4) and report["fraction_of_all_params"] < 0.35
    plan = json.loads((cell / "plan.json").read_text())
    assert plan["meta"]["magnitude"]["paper_sparsity"] == pytest.approx(0.475, abs=1e-4)
    assert json.loads((cell / "metrics/clip.json").read_text())["value"] is not None
