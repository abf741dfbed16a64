"""SD3's CLIP-L and CLIP-G are scored on what SD3's denoiser receives from them (issue 14 part 1, Table A12).

The calibration set of a CLIP (``SD3ClipReadout``, skrr/readout.py) must give the features of a real
StableDiffusion3Pipeline call: the context embedder's output on the 77 CLIP rows (hidden_states[-2] of both
CLIPs concatenated, padded to T5's width) and the pooled projection of ``time_text_embed``, dense and pruned;
the fast scoring must agree with full forwards; and a plan that changes only the pooled path must cost D.
"""
import json
import math

import pytest
import torch

from skrr.calib import CalibrationSet
from skrr.method import Skrr, skip_phase
from skrr.pipelines import PipelineSpec, build_tiny_sd3_pipeline, load_text_encoder, sd3_clip_readout
from skrr.readout import pack
from skrr.surgery import apply_plan, identity_plan

from test_encoding import PROMPTS

SPEC = PipelineSpec("tiny_sd3", "tiny_sd3", dtype="float32", max_sequence_length=32)


def calibration(which, prompts=PROMPTS, **kw):
    encoder, tokenizer = load_text_encoder(SPEC, "cpu", which)
    readout = sd3_clip_readout(SPEC, which, prompts, encoder=encoder, **{k: v for k, v in kw.items()
                                                                         if k in ("pooled_weight", "clip_last_block")})
    from skrr.readout import sd3_clip_encoding

    return CalibrationSet(encoder, tokenizer, prompts, None, encoding=sd3_clip_encoding(tokenizer), readout=readout,
                          batch_size=3)


def pipeline_inputs(pipe, prompts):
    """(context embedder output on the CLIP rows, pooled projection output) of a real SD3 call, no CFG."""
    seen = {}
    t = pipe.transformer
    hooks = [t.context_embedder.register_forward_hook(lambda m, a, o: seen.setdefault("ctx", o.detach().clone())),
             t.time_text_embed.text_embedder.register_forward_hook(
                 lambda m, a, o: seen.setdefault("pooled", o.detach().clone()))]
    try:
        pipe(prompt=prompts, height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=32)
    finally:
        for h in hooks:
            h.remove()
    return seen["ctx"][:, :77], seen["pooled"]


def unpack(features, ctx_width=16):
    """Undo ``pack`` with pooled_weight 1 (tiny SD3: context and pooled widths are both 16)."""
    n, rows, w = features.shape
    elements = rows * w
    ctx = features[:, :77] / math.sqrt(elements / (77 * w))
    pooled = features[:, 77:].reshape(n, -1)[:, :ctx_width] / math.sqrt(elements / ctx_width)
    return ctx, pooled


def skip_last_block_plan(encoder):
    """The last block's two units skipped: hidden_states[-2] is unchanged, only the pooled output moves."""
    plan = identity_plan(encoder)
    n = plan.num_positions
    return plan.with_slots({n - 2: None, n - 1: None})


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_features_equal_what_the_sd3_denoiser_receives(which):
    calib = calibration(which)
    pipe = build_tiny_sd3_pipeline(0)
    ctx, pooled = pipeline_inputs(pipe, PROMPTS)
    got_ctx, got_pooled = unpack(torch.cat(calib.dense))
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    # Pruned: the plan's encoder inside the real pipeline (middle block's FFN skipped, last block whole skipped).
    plan = skip_last_block_plan(calib.encoder).with_slots({3: None})
    component = "text_encoder" if which == "clip_l" else "text_encoder_2"
    setattr(pipe, component, apply_plan(getattr(pipe, component), plan))
    ctx, pooled = pipeline_inputs(pipe, PROMPTS)
    got_ctx, got_pooled = unpack(torch.cat(calib.encode(plan)))
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)


def test_pooled_path_is_scored():
    calib = calibration("clip_l")
    plan = skip_last_block_plan(calib.encoder)
    d = calib.discrepancy(plan)
    assert d > 0  # the context rows do not change: all of D comes from the pooled projection
    ctx, pooled = unpack(torch.cat(calib.encode(plan)))
    dense_ctx, dense_pooled = unpack(torch.cat(calib.dense))
    assert torch.equal(ctx, dense_ctx)
    heavier = calibration("clip_l", pooled_weight=3.0)
    assert heavier.discrepancy(plan) == pytest.approx(3 * d, rel=1e-5)


def test_pack_weights_the_two_terms():
    g = torch.Generator().manual_seed(0)
    ctx, ctx2 = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    pooled, pooled2 = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    packed = (pack(ctx, pooled, 0.5) - pack(ctx2, pooled2, 0.5)).pow(2).mean()
    want = (ctx - ctx2).pow(2).mean() + 0.5 * (pooled - pooled2).pow(2).mean()
    assert packed.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_fast_scoring_equals_full_forwards(which):
    calib = calibration(which)
    n = calib.identity.num_positions
    plans = [identity_plan(calib.encoder).with_slots({u: None}) for u in range(n)]
    plans.append(skip_last_block_plan(calib.encoder))
    fast = calib.discrepancies(plans)
    slow = [calib.discrepancy(p) for p in plans]
    assert fast == pytest.approx(slow, rel=1e-5, abs=1e-12)  # BLAS rounds stacked rows differently
    # From stored beam states (the Skip phase's bases): still exact, also for plans that skip after the tap.
    base = calib.prefix_states(plans[0])
    two = [p.with_slots({0: None}) for p in plans[1:]]
    assert calib.discrepancies(two, bases=[base]) == pytest.approx([calib.discrepancy(p) for p in two], rel=1e-5)


def test_skrr_search_is_identical_with_and_without_the_prefix_cache():
    calib = calibration("clip_g")
    fast = Skrr(beam_width=2, prefix_cache=True, progress=False).search_many(calib, [0.004])[0.004]
    slow = Skrr(beam_width=2, prefix_cache=False, progress=False).search_many(calib, [0.004])[0.004]
    assert fast == slow


def test_kept_candidate_states_never_start_a_plan_past_the_tap():
    """Rounds of the beam search restart candidates from states kept in the last round (RestartStates), but
    never past the state the readout reads: the same beams and scores as full forwards."""
    calib = calibration("clip_l")
    fast = skip_phase(calib, beam_width=3, max_rounds=4, prefix_cache=True, progress=False)
    slow = skip_phase(calib, beam_width=3, max_rounds=4, prefix_cache=False, progress=False)
    assert [[b.order for b in r] for r in fast.rounds] == [[b.order for b in r] for r in slow.rounds]
    assert [b.score for r in fast.rounds for b in r] == pytest.approx([b.score for r in slow.rounds for b in r],
                                                                      rel=1e-5)


def test_last_block_can_be_protected():
    calib = calibration("clip_l", clip_last_block=False)
    n = calib.identity.num_positions
    assert calib.protected == (n - 2, n - 1)
    # Every round the search may run: the path takes every other unit, never the last block's.
    path = skip_phase(calib, beam_width=2, max_rounds=n, progress=False).order
    assert sorted(path) == list(range(n - 2))
    assert calibration("clip_l").protected == ()


def test_readout_refuses_other_metrics():
    encoder, tokenizer = load_text_encoder(SPEC, "cpu", "clip_l")
    readout = sd3_clip_readout(SPEC, "clip_l", PROMPTS, encoder=encoder)
    with pytest.raises(ValueError, match="metric=mse"):
        CalibrationSet(encoder, tokenizer, PROMPTS, None, readout=readout, metric="cosine")
    with pytest.raises(ValueError, match="one per calibration prompt"):
        from skrr.readout import sd3_clip_encoding

        CalibrationSet(encoder, tokenizer, PROMPTS[:2], None, readout=readout, encoding=sd3_clip_encoding(tokenizer))


# ------------------------------------------------------------------------------------------ run.py cells
def run_cli(*args):
    import run

    run.cli(["logger=none", "device=cpu", "pipeline=tiny_sd3", "calib.num_calib_prompts=8", "method.progress=false",
             *args])


def test_a_cell_prunes_all_three_encoders_and_caches_each_search(tmp_path, capsys):
    from skrr.plan import PruningPlan
    from skrr.surgery import signature

    results = tmp_path / "r"
    cell = results / "runs/tiny_sd3/skrr-all_encoders/s0.419/seed0"
    both = ["method=skrr", "sparsity=0.419", "tag=all_encoders", "sd3_clip.max_rounds=6", "eval=offline",
            "~eval.fid", "~eval.dreamsim", "~eval.clip", "encoders={clip_l: 0.306, clip_g: 0.303}"]
    run_cli(f"paths.results={results}", *both)
    cost = json.loads((cell / "metrics/cost.json").read_text())["params"]
    for name, component, target in (("clip_l", "text_encoder", 0.306), ("clip_g", "text_encoder_2", 0.303)):
        encoder, _ = load_text_encoder(SPEC, "cpu", name)
        plan = PruningPlan.from_json(cell / f"plan_{name}.json").validate(signature(encoder))
        assert plan.meta["realized_sparsity"] >= target
        assert plan.meta["calib"]["readout"] == f"sd3_{name}"  # scored on SD3's denoiser-side features
        # What generation ran: the pruned CLIP's parameters.
        assert cost[component] == sum(p.numel() for p in apply_plan(encoder, plan).parameters())
    t5_plan = PruningPlan.from_json(cell / "plan.json")
    assert t5_plan.meta["target_sparsity"] == pytest.approx(0.419)
    searched = sorted(p.parent.name for p in (results / "plans").rglob("skrr-*.json"))
    assert searched == ["skrr--tiny-clip-g", "skrr--tiny-clip-l", "skrr--tiny-t5"]
    # A T5-only cell of the same sweep takes the cached T5 search (no new record) and keeps its own folder.
    run_cli(f"paths.results={results}", "method=skrr", "sparsity=0.419", "stages=[search]")
    assert len(list((results / "plans").rglob("skrr-*.json"))) == 3
    assert json.loads((results / "runs/tiny_sd3/skrr/s0.419/seed0/plan.json").read_text()) == json.loads(
        (cell / "plan.json").read_text())
    assert not list((results / "runs/tiny_sd3/skrr/s0.419/seed0").glob("plan_*.json"))
    # Each pruned CLIP ships like the T5: exported from the cell, it is SD3's text_encoder / text_encoder_2.
    from test_export import run_script

    code, out, err = run_script(["--cell", cell, "--encoder", "clip_l", "--out", tmp_path / "clip_l"], capsys)
    assert code == 0 and "the text_encoder/ component" in out, err
    code, out, err = run_script(["--cell", results / "runs/tiny_sd3/skrr/s0.419/seed0", "--encoder", "clip_l",
                                 "--out", tmp_path / "none"], capsys)
    assert code == 2 and "has no plan_clip_l.json" in err and err.count("\n") == 1


def test_cells_without_encoders_keep_their_signature():
    from hydra import compose, initialize_config_dir

    import run

    with initialize_config_dir(config_dir=str(run.CONFIG_DIR), version_base="1.3"):
        plain = compose(config_name="config", overrides=["pipeline=tiny_sd3"])
        extra = compose(config_name="config", overrides=["pipeline=tiny_sd3", "encoders.clip_l=0.3"])
    assert "encoders" not in run.config_that_matters(plain) and "sd3_clip" not in run.config_that_matters(plain)
    assert run.config_that_matters(extra)["encoders"] == {"clip_l": 0.3}


def test_real_sd3_folder_loads_the_clip_parts_and_exports_a_clip_plan(tmp_path, capsys):
    """The loading code a user with SD3's weights runs (a diffusers folder: CLIPTextModelWithProjection subfolders,
    only the context embedder's and pooled projection's tensors read from the transformer checkpoint), here on
    the tiny pipeline saved as such a folder."""
    from skrr.export import load_pruned
    from skrr.pipelines import load_pruned_text_encoder
    from test_export import run_script

    folder = tmp_path / "sd3"
    build_tiny_sd3_pipeline(0).save_pretrained(folder)
    real = PipelineSpec("sd3", "sd3", model_id=str(folder), dtype="float32", max_sequence_length=32)
    encoder, tokenizer = load_text_encoder(real, "cpu", "clip_g")
    readout = sd3_clip_readout(real, "clip_g", PROMPTS, encoder=encoder)
    from skrr.readout import sd3_clip_encoding

    on_disk = CalibrationSet(encoder, tokenizer, PROMPTS, None, encoding=sd3_clip_encoding(tokenizer),
                             readout=readout, batch_size=3)
    torch.testing.assert_close(torch.cat(on_disk.dense), torch.cat(calibration("clip_g").dense), rtol=0, atol=1e-6)
    # Lean load of a pruned CLIP-G (kept tensors only) = apply_plan on the dense one; export and reload it.
    plan = skip_last_block_plan(encoder).with_slots({1: None})
    lean, _ = load_pruned_text_encoder(real, plan, "cpu", "clip_g")
    ids = on_disk.batches[0].input_ids
    want = apply_plan(encoder, plan)(ids, output_hidden_states=True)
    got = lean(ids, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    plan.to_json(tmp_path / "plan.json")
    code, out, err = run_script(["--plan", tmp_path / "plan.json", "--model-id", folder, "--kind", "sd3",
                                 "--encoder", "clip_g", "--out", tmp_path / "enc"], capsys)
    assert code == 0, err
    assert "text_encoder_2/ component" in out
    torch.testing.assert_close(load_pruned(tmp_path / "enc")(ids)[0], want[0], rtol=0, atol=0)
