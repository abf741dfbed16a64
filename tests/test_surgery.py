"""Surgery is exact: identity is bit-identical, a skip is a zeroed branch, re-use shares tensors, the
relative position bias survives, sparsity matches hand counts, and the copy-free path equals apply_plan."""
import copy
import gc
import weakref

import pytest
import torch

from skrr import PlanError, PruningPlan, Slot, StackRunner, apply_plan, count_params, identity_plan
from skrr import realized_sparsity, signature, units
from skrr.tiny import tiny_t5


def hidden(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", ["t5", "clip_text", "bert"])
def test_identity_plan_is_bit_identical(name, request, tokens):
    model = request.getfixturevalue(name)
    ids, mask = tokens
    mask = None if name == "clip_text" else mask
    pruned = apply_plan(model, identity_plan(model))
    assert torch.equal(hidden(pruned, ids, mask), hidden(model, ids, mask))
    assert torch.equal(StackRunner(model).forward(identity_plan(model), ids, mask), hidden(model, ids, mask))


def test_skipping_a_unit_equals_zeroing_its_branch(t5, tokens):
    ids, mask = tokens
    plan = identity_plan(t5).with_slots({3: None, 4: None})  # FFN of block 1, attention of block 2
    zeroed = copy.deepcopy(t5)
    with torch.no_grad():
        zeroed.encoder.block[1].layer[1].DenseReluDense.wo.weight.zero_()
        zeroed.encoder.block[2].layer[0].SelfAttention.o.weight.zero_()
    torch.testing.assert_close(hidden(apply_plan(t5, plan), ids, mask), hidden(zeroed, ids, mask), rtol=0, atol=1e-6)


def test_clip_sub_block_skip_equals_zeroed_branch(clip_text, tokens):
    ids, _ = tokens
    plan = identity_plan(clip_text).with_slots({1: None})  # MLP of block 0
    zeroed = copy.deepcopy(clip_text)
    with torch.no_grad():
        zeroed.encoder.layers[0].mlp.fc2.weight.zero_()
        zeroed.encoder.layers[0].mlp.fc2.bias.zero_()
    torch.testing.assert_close(hidden(apply_plan(clip_text, plan), ids), hidden(zeroed, ids), rtol=0, atol=1e-6)


def test_bert_is_pruned_in_whole_blocks(bert, tokens):
    ids, mask = tokens
    assert [u.kind for u in units(bert)] == ["block"] * 3
    with pytest.raises(ValueError, match="blocks"):
        units(bert, "unit")
    plan = identity_plan(bert).with_slots({1: None})
    shorter = copy.deepcopy(bert)
    shorter.encoder.layer = torch.nn.ModuleList([shorter.encoder.layer[0], shorter.encoder.layer[2]])
    torch.testing.assert_close(hidden(apply_plan(bert, plan), ids, mask), hidden(shorter, ids, mask), rtol=0, atol=0)


def test_reused_unit_shares_storage_and_params_drop_by_skipped_units(t5, tokens):
    sizes = units(t5)
    skipped = identity_plan(t5).with_slots({4: None, 5: None})
    reused = skipped.with_slots({4: Slot(2, "attn"), 5: Slot(7, "ffn")})
    dense_n = count_params(t5)
    for plan in (skipped, reused):
        assert count_params(apply_plan(t5, plan)) == dense_n - sizes[4].params - sizes[5].params
    pruned = apply_plan(t5, reused)
    blocks = pruned.encoder.block
    assert blocks[2].units[0] is blocks[1].units[0]           # position 4 runs unit 2: the same module
    q_pos4 = blocks[2].units[0].layer.SelfAttention.q.weight
    assert q_pos4.data_ptr() == t5.encoder.block[1].layer[0].SelfAttention.q.weight.data_ptr()
    ids, mask = tokens
    assert not torch.equal(hidden(pruned, ids, mask), hidden(apply_plan(t5, skipped), ids, mask))


@pytest.mark.parametrize("skip", [{0: None}, {0: None, 1: None}])
def test_relative_position_bias_survives_skipping_unit_or_block_0(t5, tokens, skip):
    ids, mask = tokens
    plan = identity_plan(t5).with_slots(skip)
    reference = copy.deepcopy(t5)  # zeroing block 0's branches keeps its bias computation in transformers
    with torch.no_grad():
        reference.encoder.block[0].layer[0].SelfAttention.o.weight.zero_()
        if 1 in skip:
            reference.encoder.block[0].layer[1].DenseReluDense.wo.weight.zero_()
    out = hidden(apply_plan(t5, plan), ids, mask)
    torch.testing.assert_close(out, hidden(reference, ids, mask), rtol=0, atol=1e-6)
    no_bias = copy.deepcopy(t5)
    with torch.no_grad():
        no_bias.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    assert (out - hidden(apply_plan(no_bias, plan), ids, mask)).abs().max() > 1e-3  # the bias is really used


def test_reusing_unit_0_elsewhere_uses_the_computed_bias(t5, tokens):
    ids, mask = tokens
    plan = identity_plan(t5).with_slots({2: Slot(0, "attn")})
    pruned = apply_plan(t5, plan)
    with torch.no_grad():  # by hand: embed, unit 0, unit 1, unit 0 again, units 3.., final norm
        runner = StackRunner(t5)
        h, ctx = runner.prepare(ids, mask)
        for i in [0, 1, 0, 3, 4, 5, 6, 7]:
            h = runner.units[i](h, ctx)
        expected = runner.finish(h)
    assert torch.equal(hidden(pruned, ids, mask), expected)


def test_realized_sparsity_matches_hand_counts(t5, clip_text, bert):
    # tiny T5: d=32, d_ff=64, 4 blocks, vocab 160, 8 buckets x 4 heads of relative bias
    attn, ffn = 4 * 32 * 32 + 32, 3 * 32 * 64 + 32
    total = 160 * 32 + 4 * (attn + ffn) + 32 + 8 * 4
    assert count_params(t5) == total
    plan = identity_plan(t5).with_slots({1: None, 2: None, 5: None})
    assert realized_sparsity(t5, plan) == pytest.approx((2 * ffn + attn) / total, abs=0)
    # tiny CLIP text: d=32, mlp 64, 3 layers, vocab 100, 32 positions; pre-LN with biases
    c_attn = 4 * (32 * 32 + 32) + 2 * 32
    c_mlp = 32 * 64 + 64 + 64 * 32 + 32 + 2 * 32
    c_total = 100 * 32 + 32 * 32 + 3 * (c_attn + c_mlp) + 2 * 32
    assert count_params(clip_text) == c_total
    assert realized_sparsity(clip_text, identity_plan(clip_text).with_slots({3: None})) == pytest.approx(c_mlp / c_total, abs=0)
    # tiny BERT: post-LN layer = attention (4 linears + LN) + intermediate + output (+ LN)
    b_layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
    b_total = (100 + 64 + 2) * 32 + 2 * 32 + 3 * b_layer
    assert count_params(bert) == b_total
    assert realized_sparsity(bert, identity_plan(bert).with_slots({0: None, 2: None})) == pytest.approx(2 * b_layer / b_total, abs=0)


def test_reuse_and_merge_do_not_change_sparsity(t5):
    skip = identity_plan(t5).with_slots({4: None})
    assert realized_sparsity(t5, skip.with_slots({4: Slot(2, "attn")})) == realized_sparsity(t5, skip)


def test_dropped_weights_are_freed_and_class_is_kept(tokens):
    t5 = tiny_t5(num_layers=4)  # not the fixture: pytest would keep the dense model alive
    plan = identity_plan(t5).with_slots({2: None, 3: None})
    dropped = weakref.ref(t5.encoder.block[1].layer[1].DenseReluDense.wo.weight)
    kept = t5.encoder.block[2].layer[1].DenseReluDense.wo.weight
    pruned = apply_plan(t5, plan)
    assert type(pruned) is type(t5) and pruned.config is t5.config and pruned.dtype == t5.dtype
    del t5
    gc.collect()
    assert dropped() is None  # nothing in the pruned encoder holds the removed FFN
    assert any(p is kept for p in pruned.parameters())
    ids, mask = tokens
    assert hidden(pruned, ids, mask).shape == (2, 12, 32)


def test_inplace_surgery_and_double_application(t5):
    plan = identity_plan(t5).with_slots({0: None})
    n = count_params(t5)
    same = apply_plan(t5, plan, inplace=True)
    assert same is t5 and count_params(t5) == n - units(tiny_t5(num_layers=4))[0].params
    with pytest.raises(PlanError, match="already pruned"):
        apply_plan(t5, plan)


def test_hidden_states_keep_the_original_length(t5, tokens):
    ids, mask = tokens
    pruned = apply_plan(t5, identity_plan(t5).with_slots({2: None, 3: None}))
    with torch.no_grad():
        out = pruned(ids, attention_mask=mask, output_hidden_states=True)
        dense = t5(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(dense.hidden_states) == 5
    torch.testing.assert_close(out.hidden_states[2], out.hidden_states[1])  # block 1 is skipped whole


@pytest.mark.parametrize("plan_of", [
    lambda m: identity_plan(m).with_slots({1: None, 6: None, 3: Slot(5, "ffn")}),
    lambda m: PruningPlan.from_skips(signature(m), [0, 2], "block"),
    lambda m: PruningPlan(signature(m), "block", (Slot(0, "block"), Slot(1, "block", (1, 2, 3)), None, None)),
])
def test_fast_path_equals_apply_plan(t5, tokens, plan_of):
    ids, mask = tokens
    plan = plan_of(t5)
    runner = StackRunner(t5, plan.granularity)
    assert torch.equal(runner.forward(plan, ids, mask), hidden(apply_plan(t5, plan), ids, mask))
    assert count_params(t5) == sum(p.numel() for p in t5.parameters())  # no copy added to the dense model


def test_merged_block_follows_the_laco_formula(t5, tokens):
    plan = PruningPlan(signature(t5), "block", (Slot(0, "block"), Slot(1, "block", (1, 2)), None, Slot(3, "block")))
    pruned = apply_plan(t5, plan)
    merged_q = pruned.encoder.block[1].units[0].units[0].layer.SelfAttention.q.weight
    q = [t5.encoder.block[b].layer[0].SelfAttention.q.weight for b in (1, 2)]
    torch.testing.assert_close(merged_q, q[0] + (q[1] - q[0]))
    assert count_params(pruned) == count_params(t5) - units(t5, "block")[2].params
