"""Calibration encodes prompts exactly as each pipeline feeds its denoiser (issue 12 part 1, SPEC §1 trap 3).

For tiny PixArt-Σ, SD3 and FLUX (the real diffusers pipeline classes, built from configs), the calibration
set's features must equal what the denoiser's own caption projection receives during a real pipeline call
made with generation's settings, for the dense encoder and for the pruned encoder inside the pruned pipeline.
"""
import pytest
import torch
from hydra import compose, initialize_config_dir

from skrr.calib import CalibrationSet
from skrr.encoding import PromptEncoding
from skrr.experiments.stages import generation_settings, pruned_pipeline
from skrr.pipelines import KINDS, PipelineSpec, caption_projection_of, load_pipeline, text_encoder_of
from skrr.plan import Slot
from skrr.surgery import identity_plan
from skrr.tiny import tiny_t5, tiny_t5_tokenizer

from test_configs import CONFIGS

# One prompt longer than max length (32 tokens: truncated), one empty, upper case and stray spaces (PixArt-Σ
# cleans captions before tokenizing), and ordinary ones of different lengths (padding differs per row).
PROMPTS = [
    "A Photo of a CAT sitting on a red sofa next to a window  ",
    "",
    "an astronaut riding a horse on the moon, digital art, with two dogs playing in the snow in front of a blue "
    "house and three birds flying over the ocean under a cloudy sky, a watercolor painting of mountains",
    "a green bicycle",
]


def pipeline_cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=[f"pipeline={name}", *overrides])


def denoiser_features(pipe, spec, cfg, prompts):
    """What the denoiser's caption projection outputs for the T5 rows of ``prompts`` in a real pipeline call
    made with generation's call settings (no CFG, so row i is prompt i)."""
    settings = generation_settings(cfg)
    proj = caption_projection_of(pipe)
    seen = []
    handle = proj.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        pipe(prompt=prompts, height=settings.height, width=settings.width, num_inference_steps=1,
             guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
             **settings.call_kwargs)
    finally:
        handle.remove()
    out = seen[0]
    assert out.shape[0] == len(prompts)
    # SD3 concatenates CLIP-L/G (77 positions) before T5 along the sequence: the T5 part is the last L rows.
    return out[:, -spec.max_sequence_length:]


def calib_features(calib, plan=None):
    """The calibration set's features of every prompt (prompt order), dense or under a plan."""
    return torch.cat(calib.dense if plan is None else calib.encode(plan))


def pruned_plan(encoder):
    """Unit 1 (an FFN) skipped, unit 4 (an attention) re-using unit 2's weights (Skrr's Re-use)."""
    return identity_plan(encoder).with_slots({1: None, 4: Slot(2, "attn")})


@pytest.fixture(scope="module", params=["tiny", "tiny_sd3", "tiny_flux"])
def kind(request):
    cfg = pipeline_cfg(request.param)
    spec = PipelineSpec.from_config(cfg.pipeline)
    pipe = load_pipeline(spec)
    encoder = text_encoder_of(pipe, spec)
    tokenizer = getattr(pipe, KINDS[spec.kind]["tokenizer"])
    calib = CalibrationSet(encoder, tokenizer, PROMPTS, caption_projection_of(pipe), encoding=spec.encoding,
                           batch_size=3)
    return cfg, spec, pipe, calib


def test_long_prompt_is_truncated_and_padding_is_present(kind):
    _, spec, _, calib = kind
    ids = torch.cat([b.input_ids for b in calib.batches])
    mask = torch.cat([b.attention_mask for b in calib.batches])
    assert ids.shape == (len(PROMPTS), spec.max_sequence_length)
    assert mask[2].all() and not mask[3].all()  # the long prompt fills every position, the short one is padded


def test_dense_features_are_what_the_denoiser_receives(kind):
    cfg, spec, pipe, calib = kind
    want = denoiser_features(pipe, spec, cfg, PROMPTS)
    torch.testing.assert_close(calib_features(calib), want, rtol=0, atol=1e-6)
    with torch.no_grad():  # PromptEncoding.encode: the encoder called as the pipeline calls it
        direct = calib.features(spec.encoding.encode(calib.encoder, calib.tokenizer, PROMPTS))
    torch.testing.assert_close(direct, want, rtol=0, atol=1e-6)
    # ∅ is the empty prompt encoded the same way
    torch.testing.assert_close(calib.dense_null[0], want[1], rtol=0, atol=1e-6)


def test_pruned_features_are_what_the_pruned_pipeline_feeds_its_denoiser(kind):
    cfg, spec, _, calib = kind
    plan = pruned_plan(calib.encoder)
    got = calib_features(calib, plan)
    pipe, _ = pruned_pipeline(spec, plan, torch.device("cpu"))  # what generation runs
    assert text_encoder_of(pipe, spec).pruning_plan.slots == plan.slots
    want = denoiser_features(pipe, spec, cfg, PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - calib_features(calib)).abs().max() > 1e-3  # the plan changes the features


def test_sd3_and_flux_run_t5_without_mask_so_padding_depends_on_the_prompt(kind):
    _, spec, _, calib = kind
    encoding = spec.encoding
    assert encoding.masks_encoder == (KINDS[spec.kind]["family"] == "pixart_sigma")
    feats = calib_features(calib)
    masked = PromptEncoding("plain", spec.max_sequence_length)
    ids, mask = masked.tokenize(calib.tokenizer, encoding.preprocess(PROMPTS))
    with torch.no_grad():
        with_mask = calib.features(calib.encoder(ids, attention_mask=mask)[0])
    differs = (feats - with_mask).abs().amax(dim=(1, 2)) > 1e-4
    # With T5 unmasked, a padded prompt's features differ from the masked ones; a full-length one does not.
    padded = (~mask.bool().all(dim=1)).tolist()
    assert padded[3] and not padded[2]
    assert differs.tolist() == ([False] * len(PROMPTS) if encoding.masks_encoder else padded)


def test_token_mask_scores_match_full_passes_without_cutting_the_unmasked_padding():
    """SD3/FLUX: valid tokens attend to the padding, so the fast scorer must not cut it off (PixArt-Σ may)."""
    encoder = tiny_t5(num_layers=4, seed=1)
    tokenizer = tiny_t5_tokenizer()
    for family in ("sd3", "pixart_sigma"):
        calib = CalibrationSet(encoder, tokenizer, PROMPTS, None, encoding=PromptEncoding(family, 40),
                               use_projection=False, token_mask=True)
        plans = [identity_plan(encoder).with_slots({u: None}) for u in range(1, 8)]
        fast = calib.discrepancies(plans)
        slow = [calib.discrepancy(p) for p in plans]
        assert fast == pytest.approx(slow, rel=1e-5, abs=1e-9), family


def test_generation_gets_the_encoding_and_conflicting_call_kwargs_are_refused():
    cfg = pipeline_cfg("tiny")
    call = generation_settings(cfg).call_kwargs
    assert call["max_sequence_length"] == 32 and call["clean_caption"] is True
    assert "clean_caption" not in generation_settings(pipeline_cfg("tiny_sd3")).call_kwargs
    cfg = pipeline_cfg("tiny", "+pipeline.call_kwargs.max_sequence_length=300")
    with pytest.raises(ValueError, match="pipeline.call_kwargs.max_sequence_length.*pipeline.max_sequence_length"):
        generation_settings(cfg)


def test_bad_encoding_settings_are_refused():
    with pytest.raises(ValueError, match="clean_caption is a PixArt"):
        PipelineSpec.from_config({"name": "s", "kind": "sd3", "clean_caption": True})
    with pytest.raises(ValueError, match="max_sequence_length must be positive"):
        PipelineSpec.from_config({"name": "s", "kind": "flux", "max_sequence_length": 0})
    with pytest.raises(ValueError, match="contradicts"):
        CalibrationSet(tiny_t5(num_layers=2), tiny_t5_tokenizer(), ["a"], None, use_projection=False,
                       encoding=PromptEncoding("sd3", 16), max_length=32)


def test_tiny_sd3_and_flux_cells_run_every_stage_and_search_on_their_own_encoding(tmp_path):
    """run.py search -> generate -> score on tiny SD3 and FLUX. The three tiny kinds share one T5, so only the
    pipeline and its encoding tell their plan-cache entries apart: each gets its own search."""
    from test_run import run

    for name in ("tiny_sd3", "tiny_flux"):
        run(f"pipeline={name}", "method=skrr", "sparsity=0.1", "calib.num_calib_prompts=4", "eval=offline",
            "~eval.fid", "~eval.dreamsim", "~eval.cost", "eval.clip.prompts.samples_per_prompt=1", results=tmp_path)
        cell = tmp_path / f"runs/{name}/skrr/s0.100/seed0"
        assert (cell / "plan.json").is_file()
        assert len((cell / "images/tiny/manifest.jsonl").read_text().splitlines()) > 0
        assert (cell / "metrics/clip.json").is_file()
    assert len(list((tmp_path / "plans").rglob("skrr-*.json"))) == 2
