"""Baselines (SPEC §4): ShortGPT and FinerCut find planted identity blocks/sub-blocks, LaCo's merge equals the
RDSC formula and its sweep follows Alg. 1, magnitude pruning hits the sparsity exactly, re-use is wired in."""
import copy

import pytest
import torch

from baselines import prune_encoder
from baselines.finercut import FinerCut, output_distance
from baselines.laco import LaCo, fewshot_batch, groups_to_plan, output_similarity
from baselines.magnitude import (Magnitude, load_sparse, magnitude_rule, prunable_weights, prune_, save_sparse,
                                 sparse_state_dict, storage_bytes)
from baselines.shortgpt import ShortGPT, block_influence
from skrr import PlanError, PruningPlan, Slot, StackRunner, apply_plan, count_params, realized_sparsity
from skrr.calib import DEFAULT_PROMPTS, CalibrationSet, load_prompts
from skrr.interface import SparsityError, removed_fraction
from skrr.plan import part_of
from skrr.tiny import tiny_t5, tiny_t5_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_t5_tokenizer()


def make_calib(encoder, tokenizer, granularity=None, max_length=16):
    """8 prompts, 16 tokens, no projection (the baselines score raw encoder states)."""
    prompts = load_prompts(DEFAULT_PROMPTS)[:8]
    return CalibrationSet(encoder, tokenizer, prompts, None, max_length=max_length, use_projection=False,
                          batch_size=4, granularity=granularity)


def plant_identity(encoder, attn_blocks=(), ffn_blocks=()):
    """Zero the output projection of some branches: those sub-blocks become exactly the identity."""
    with torch.no_grad():
        for b in attn_blocks:
            encoder.encoder.block[b].layer[0].SelfAttention.o.weight.zero_()
        for b in ffn_blocks:
            encoder.encoder.block[b].layer[1].DenseReluDense.wo.weight.zero_()
    return encoder


def blocks_fraction(encoder, positions, granularity):
    """Realized sparsity of removing exactly these positions."""
    plan = PruningPlan.from_skips(StackRunner(encoder, granularity).signature, positions, granularity)
    return realized_sparsity(encoder, plan)


# ------------------------------------------------------------------------------------------------ ShortGPT
def test_shortgpt_removes_planted_identity_blocks(tokenizer):
    enc = plant_identity(tiny_t5(num_layers=6, seed=1), attn_blocks=(1, 4), ffn_blocks=(1, 4))
    calib = make_calib(enc, tokenizer)
    bi = block_influence(calib)
    assert bi[1] == pytest.approx(0, abs=1e-6) and bi[4] == pytest.approx(0, abs=1e-6)
    assert min(bi[i] for i in (0, 2, 3, 5)) > 1e-3
    two = blocks_fraction(enc, [1, 4], "block")
    plans = ShortGPT().search_many(calib, [0.0, two])
    assert plans[0.0].is_identity
    plan = plans[two]
    assert plan.granularity == "block" and plan.method == "shortgpt"
    assert set(plan.skipped) == {1, 4} and not plan.reused
    assert plan.meta["realized_sparsity"] == pytest.approx(two)
    assert plan.meta["settings"]["exclude_padding"] is True and "prompt_hash" in plan.meta["calib"]


@pytest.mark.parametrize("exclude_padding", [True, False])
def test_shortgpt_bi_is_on_raw_block_states(tokenizer, exclude_padding):
    """BI from forward hooks on the HF blocks (input/output before the final LayerNorm, SPEC §1 trap 1)."""
    enc = tiny_t5(num_layers=4, seed=2)
    # 96 tokens: the prompts (49-72 tokens) get padding. ShortGPT runs blocks whatever calib's granularity.
    calib = make_calib(enc, tokenizer, granularity="unit", max_length=96)
    assert not calib.batches[0].attention_mask.all()
    ins, outs = {}, {}

    def hook(i):
        def fn(module, args, kwargs, output):
            ins[i] = args[0] if args else kwargs["hidden_states"]
            outs[i] = output[0]
        return fn

    handles = [blk.register_forward_hook(hook(i), with_kwargs=True) for i, blk in enumerate(enc.encoder.block)]
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for b in calib.batches:
            enc(b.input_ids, attention_mask=b.attention_mask)
            keep = b.attention_mask.bool() if exclude_padding else torch.ones_like(b.attention_mask, dtype=torch.bool)
            for i in range(4):
                sums[i] += torch.nn.functional.cosine_similarity(ins[i], outs[i], dim=-1)[keep].double().sum()
            count += int(keep.sum())
    for h in handles:
        h.remove()
    expected = [1 - float(s) / count for s in sums]
    assert block_influence(calib, exclude_padding) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------ FinerCut
@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_finercut_removes_planted_identity_units(tokenizer, metric):
    enc = plant_identity(tiny_t5(num_layers=4, seed=3), attn_blocks=(2,), ffn_blocks=(0, 3))  # units 4, 1, 7
    calib = make_calib(enc, tokenizer)
    target = blocks_fraction(enc, [1, 4, 7], "unit")
    plan = FinerCut(metric=metric, num_steps=4).search(calib, target)
    assert plan.meta["order"][:3] == [1, 4, 7]  # distance exactly 0 for each; ties go to the lower index
    assert plan.meta["step_distance"][:3] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert plan.meta["step_distance"][3] > 1e-4
    assert set(plan.skipped) == {1, 4, 7} and plan.granularity == "unit"
    assert plan.meta["realized_sparsity"] == pytest.approx(target)


def test_finercut_greedy_step_equals_brute_force(tokenizer):
    """The shared-prefix shortcut gives the same scores as full forwards, at the second greedy step."""
    enc = tiny_t5(num_layers=3, seed=4)
    calib = make_calib(enc, tokenizer)
    order, scores = FinerCut(num_steps=2).greedy_order(calib, 0.0)
    runner = calib.runner
    dense = [runner.forward(calib.identity, b.input_ids, b.attention_mask) for b in calib.batches]

    def score(skips):
        plan = PruningPlan.from_skips(runner.signature, skips, "unit")
        tot = [output_distance(d, runner.forward(plan, b.input_ids, b.attention_mask), None, "mse")
               for d, b in zip(dense, calib.batches)]
        return sum(s for s, _ in tot) / sum(c for _, c in tot)

    first = min(range(6), key=lambda u: (score([u]), u))
    second = min((u for u in range(6) if u != first), key=lambda u: (score([first, u]), u))
    assert order == [first, second]
    assert scores == pytest.approx([score([first]), score([first, second])], rel=1e-6)


def test_finercut_refuses_block_calibration(tokenizer):
    calib = make_calib(tiny_t5(num_layers=2), tokenizer, granularity="block")
    with pytest.raises(ValueError, match="sub-blocks"):
        FinerCut().search(calib, 0.1)


# ------------------------------------------------------------------------------------------------ LaCo
LINEARS = {0: ("SelfAttention", ("q", "k", "v", "o")), 1: ("DenseReluDense", ("wi_0", "wi_1", "wo"))}


@pytest.mark.parametrize("merged_from", [(1, 2), (1, 2, 3)])  # C = 2 and C = 3
def test_laco_merge_equals_rdsc_formula(merged_from):
    enc = tiny_t5(num_layers=5, seed=5)
    blocks = enc.encoder.block
    base, others = merged_from[0], merged_from[1:]
    expected = copy.deepcopy(enc)  # hand-built: block 1 gets the formula's weights, merged blocks are deleted
    for layer, (sub, names) in LINEARS.items():
        for name in names:
            w = lambda b: getattr(getattr(blocks[b].layer[layer], sub), name).weight.detach()  # noqa: E731
            if len(merged_from) == 2:
                want = w(2)  # C = 2: theta_1 + (theta_2 - theta_1) = theta_2
            else:
                want = w(2) + w(3) - w(1)  # C = 3: theta_1 + (theta_2 - theta_1) + (theta_3 - theta_1)
            assert not torch.equal(want, w(base))
            getattr(getattr(expected.encoder.block[base].layer[layer], sub), name).weight.data = want.clone()
    keep = [b for i, b in enumerate(expected.encoder.block) if i not in others]
    expected.encoder.block = torch.nn.ModuleList(keep)

    runner = StackRunner(enc, "block")
    slots = [Slot(i, "block") for i in range(5)]
    slots[base] = Slot(base, "block", merged_from)
    for j in others:
        slots[j] = None
    plan = PruningPlan(runner.signature, "block", tuple(slots), "laco")
    merged = runner.module_for(plan.slots[base])
    for layer, (sub, names) in LINEARS.items():
        got_layer, exp_layer = merged.units[layer].layer, expected.encoder.block[base].layer[layer]
        for name in names:
            torch.testing.assert_close(getattr(getattr(got_layer, sub), name).weight,
                                       getattr(getattr(exp_layer, sub), name).weight, rtol=0, atol=1e-6)
        assert torch.equal(got_layer.layer_norm.weight, blocks[base].layer[layer].layer_norm.weight)  # block l's
    ids = torch.randint(3, 150, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(enc, plan)(ids).last_hidden_state,
                                   expected(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert realized_sparsity(enc, plan) == pytest.approx(len(others) * 10304 / count_params(enc))


def test_laco_sweep_follows_algorithm_and_accumulates_merges(tokenizer):
    enc = tiny_t5(num_layers=6, seed=6)
    calib = make_calib(enc, tokenizer, granularity="block")
    one, two = (blocks_fraction(enc, list(range(k)), "block") for k in (1, 2))
    laco = LaCo(merge_layers=2, interval=2, layer_low=1, layer_high=24, threshold=-1.0, num_fewshot=3)
    plans = laco.search_many(calib, [0.0, one, two])
    assert plans[0.0].is_identity
    assert plans[one].merged == {4: (4, 5)} and plans[one].skipped == (5,)  # top pair first: l = min(H, 6) - C
    assert plans[two].merged == {2: (2, 3), 4: (4, 5)}  # l -= I after an accepted merge
    trials = plans[two].meta["trials"]
    assert [t["layer"] for t in trials] == [4, 2]
    # The second candidate is scored on the already merged model (merges accumulate) against the dense one.
    batch, _ = fewshot_batch(calib, 3)
    runner = StackRunner(enc, "block")
    dense = runner.forward(calib.identity, batch.input_ids, batch.attention_mask)
    out = runner.forward(plans[two], batch.input_ids, batch.attention_mask)
    assert trials[1]["similarity"] == pytest.approx(output_similarity(dense, out, batch.attention_mask), abs=1e-6)
    assert plans[two].meta["realized_sparsity"] == pytest.approx(two)
    # C = 3, I = 3: one merge of three blocks at the top; the next base (0) is below L = 1.
    plan = LaCo(merge_layers=3, interval=3, threshold=-1.0).search(calib, one)
    assert plan.merged == {3: (3, 4, 5)}


def test_laco_current_layers_map_to_original_blocks(tokenizer):
    """After a merge the model is shorter: current layer l is mapped back through the merged groups."""
    runner = StackRunner(tiny_t5(num_layers=6), "block")
    plan = groups_to_plan([(0,), (1, 2), (3,), (4, 5)], runner)
    assert plan.merged == {1: (1, 2), 4: (4, 5)} and plan.skipped == (2, 5)


def test_laco_unreachable_threshold_fails_clearly(tokenizer):
    enc = tiny_t5(num_layers=6, seed=7)
    calib = make_calib(enc, tokenizer, granularity="block")
    with pytest.raises(SparsityError) as err:
        LaCo(threshold=0.9999).search(calib, 0.1)
    msg = str(err.value)
    assert "\n" not in msg and "laco.threshold" in msg and "accepted 0 merges" in msg


def test_laco_rejected_merges_step_down_by_one(tokenizer):
    enc = tiny_t5(num_layers=6, seed=7)
    calib = make_calib(enc, tokenizer, granularity="block")
    laco = LaCo(threshold=0.9999)
    _, trials, _ = laco.sweep(calib, 0.5)
    assert [t["layer"] for t in trials] == [4, 3, 2, 1] and not any(t["accepted"] for t in trials)


def test_laco_refuses_interval_below_merge_size():
    with pytest.raises(ValueError, match="interval"):
        LaCo(merge_layers=3, interval=2)


# ------------------------------------------------------------------------------------------------ magnitude
def zeros_in(encoder):
    return sum(int((p == 0).sum()) for p in encoder.parameters())


@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_hits_sparsity_exactly(scope, dtype):
    enc = tiny_t5(num_layers=4, seed=8).to(dtype)  # bf16: many ties at the threshold
    total = count_params(enc)
    for s in (0.1, 0.37, 0.5):
        pruned = copy.deepcopy(enc)
        rule = prune_(pruned, s, scope)
        assert zeros_in(pruned) == round(s * total) == rule["num_zeroed"]
        weights = prunable_weights(pruned)
        if scope == "global":  # every zeroed |w| <= every kept |w|
            orig = dict(prunable_weights(enc))
            gone = torch.cat([orig[n].abs().flatten()[(w == 0).flatten()].float() for n, w in weights])
            kept = torch.cat([w.abs().flatten()[(w != 0).flatten()].float() for _, w in weights])
            assert gone.max() <= kept.min()
        else:  # the same fraction of every matrix, to one weight
            p = rule["num_zeroed"] / rule["prunable_params"]
            fracs = [int((w == 0).sum()) - p * w.numel() for _, w in weights]
            assert all(abs(f) <= 1 for f in fracs)


def test_magnitude_refuses_more_than_the_linear_weights():
    with pytest.raises(SparsityError, match="linear weights"):
        magnitude_rule(tiny_t5(num_layers=2), 0.95, "global")


def test_magnitude_plan_applies_and_does_not_touch_calibration_encoder(tokenizer):
    enc = tiny_t5(num_layers=4, seed=9)
    calib = make_calib(enc, tokenizer)
    before = [p.clone() for p in enc.parameters()]
    plan = Magnitude(scope="global").search(calib, 0.4)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    assert plan.is_identity and plan.method == "magnitude"
    assert plan.meta["realized_sparsity"] == pytest.approx(0.4, abs=1 / count_params(enc))
    plan = PruningPlan.from_json(plan.to_json())  # what the search stage caches
    pruned = prune_encoder(copy.deepcopy(enc), plan)
    assert zeros_in(pruned) == plan.meta["magnitude"]["num_zeroed"] and pruned.pruning_plan is plan
    with pytest.raises(PlanError, match="other weights"):
        prune_encoder(tiny_t5(num_layers=4, seed=10), plan)


def test_magnitude_sparse_storage_bytes(tmp_path):
    enc = tiny_t5(num_layers=2, seed=11)
    prune_(enc, 0.3, "layerwise")
    report = storage_bytes(enc)
    assert report["dense_bytes"] == 4 * count_params(enc)
    assert not report["sparse_saves_memory"]  # 70 % dense fp32 weights: values + int64 indices are larger
    sparse_bytes, seen = 0, set()
    for t in sparse_state_dict(enc, "csr").values():
        if t.layout == torch.sparse_csr:
            sparse_bytes += t.values().nbytes + t.crow_indices().nbytes + t.col_indices().nbytes
        elif t.data_ptr() not in seen:  # the tied embedding appears under two names
            seen.add(t.data_ptr())
            sparse_bytes += t.nbytes
    assert sparse_bytes == report["csr_bytes"]
    path = tmp_path / "enc.pt"
    save_sparse(enc, path)
    fresh = tiny_t5(num_layers=2, seed=12)
    load_sparse(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), enc.state_dict().values()))
    prune_(enc, 0.75, "global")
    assert storage_bytes(enc)["sparse_saves_memory"]


# ------------------------------------------------------------------------------------------------ Re-use
@pytest.fixture
def fake_reuse(monkeypatch):
    """A stand-in skrr.method.reuse_phase that records its calls and re-uses the nearest kept unit below."""
    calls = []

    def reuse_phase(calib, plan, order="ascending"):
        calls.append((plan, order))
        i = plan.skipped[0]
        part = part_of(i, plan.granularity)
        j = max(k for k in range(i) if plan.slots[k] is not None and plan.slots[k].part == part)
        return plan.with_slots({i: Slot(j, part)})

    monkeypatch.setattr("skrr.method.reuse_phase", reuse_phase)
    return calls


def test_reuse_flag_applies_reuse_phase_to_each_prefix(tokenizer, fake_reuse):
    enc = plant_identity(tiny_t5(num_layers=6, seed=1), attn_blocks=(1, 4), ffn_blocks=(1, 4))
    calib = make_calib(enc, tokenizer, granularity="block")
    one, two = (blocks_fraction(enc, list(range(k)), "block") for k in (1, 2))
    plans = ShortGPT(reuse=True, reuse_order="skip").search_many(calib, [one, two])
    assert [len(p.skipped) for p, _ in fake_reuse] == [1, 2] and {o for _, o in fake_reuse} == {"skip"}
    assert plans[two].reused and plans[two].meta["realized_sparsity"] == pytest.approx(two)
    calib_u = make_calib(plant_identity(tiny_t5(num_layers=4, seed=3), ffn_blocks=(3,)), tokenizer)
    plan = FinerCut(reuse=True).search(calib_u, blocks_fraction(calib_u.encoder, [7], "unit"))
    assert plan.reused == {7: 5} and fake_reuse[-1][0].skipped == (7,)
    with pytest.raises(ValueError, match="reuse_order"):
        ShortGPT(reuse=True, reuse_order="descending")


@pytest.mark.parametrize("cls,granularity", [(ShortGPT, "block"), (ShortGPT, "unit"), (FinerCut, "unit")])
def test_reuse_with_skrr_reuse_phase(tokenizer, cls, granularity):
    """reuse=true is Skrr's own Re-use phase on the baseline's skip plan: same drops, same sparsity."""
    from skrr.method import reuse_phase

    enc = tiny_t5(num_layers=4, seed=13)
    calib = CalibrationSet(enc, tokenizer, load_prompts(DEFAULT_PROMPTS)[:8], None, max_length=16,
                           use_projection=False, granularity=granularity)  # Skrr's D without projection
    plan = cls(reuse=True).search(calib, 0.4)
    base = cls(reuse=False).search(calib, 0.4)
    assert plan == reuse_phase(calib, base, order="ascending") and "reuse" in plan.meta
    assert plan.dropped == base.dropped and plan.meta["realized_sparsity"] == base.meta["realized_sparsity"]
    assert removed_fraction(enc, plan) == removed_fraction(enc, base)
    assert plan.meta["reuse"]["d_after"] <= plan.meta["reuse"]["d_before"]
