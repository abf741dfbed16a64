"""Skrr: Skip phase = Alg. 1 (beam search), Re-use phase = Alg. 2, the fast path changes nothing (SPEC §2-§3)."""
import importlib.util
import itertools
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection

from skrr import PruningPlan, Slot, apply_plan, count_params
from skrr.calib import (DEFAULT_PROMPTS, CalibrationSet, RestartStates, ScoreStats, load_prompts, plan_keys,
                        restart_positions)
from skrr.interface import SparsityError
from skrr.method import Beam, Skrr, expand, reuse_phase, skip_phase
from skrr.plan import part_of
from skrr.surgery import units
from skrr.tiny import tiny_bert, tiny_t5, tiny_t5_tokenizer

PROMPTS = load_prompts(DEFAULT_PROMPTS)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_t5_tokenizer()


def make_calib(tokenizer, encoder=None, num_prompts=3, max_length=32, projection=True, **kw):
    encoder = encoder if encoder is not None else tiny_t5(num_layers=4, seed=0)
    proj = None
    if projection:
        torch.manual_seed(0)
        proj = PixArtAlphaTextProjection(in_features=encoder.config.d_model, hidden_size=24)
    return CalibrationSet(encoder, tokenizer, PROMPTS[:num_prompts], proj, max_length=max_length,
                          use_projection=projection, **kw)


def share(encoder, positions, granularity="unit"):
    """Fraction of the encoder's parameters held by these units."""
    sizes = units(encoder, granularity)
    return sum(sizes[i].params for i in positions) / count_params(encoder)


def skrr(**kw):
    kw.setdefault("progress", False)
    return Skrr(**kw)


# ----------------------------------------------------------------------------------------------- Skip phase
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_exact_identity_units_are_skipped_with_zero_discrepancy(tokenizer, prefix_cache):
    enc = tiny_t5(num_layers=4, seed=1)
    with torch.no_grad():  # attention of block 1 (unit 2) and FFN of block 2 (unit 5) become the identity
        enc.encoder.block[1].layer[0].SelfAttention.o.weight.zero_()
        enc.encoder.block[2].layer[1].DenseReluDense.wo.weight.zero_()
    calib = make_calib(tokenizer, enc)
    plan = skrr(prefix_cache=prefix_cache).search(calib, share(enc, [2, 5]))
    assert plan.skipped == (2, 5) and not plan.reused
    assert plan.meta["search"]["path_scores"][:2] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert plan.meta["search"]["path_scores"][2] > 0
    # Ties at D = 0 go to the lexicographically smaller list (exact zeros are guaranteed on the full-pass path).
    assert plan.meta["order"][:2] == [2, 5] or (prefix_cache and sorted(plan.meta["order"][:2]) == [2, 5])
    assert calib.discrepancy(plan) == 0.0  # same shapes as the dense pass: exactly 0
    assert plan.method == "skrr" and plan.meta["realized_sparsity"] == pytest.approx(share(enc, [2, 5]))


def greedy(calib, sparsity):
    """A hand-written greedy loop (k = 1) on calib.discrepancy: lowest D, ties to the lower unit."""
    enc, order, scores = calib.encoder, [], []
    n = calib.identity.num_positions
    while share(enc, order) < sparsity - 5e-4:
        best = min((calib.discrepancy(PruningPlan.from_skips(calib.identity.encoder, order + [u])), u)
                   for u in range(n) if u not in order)
        order.append(best[1])
        scores.append(best[0])
    return order, scores


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_beam_width_one_is_greedy(tokenizer, prefix_cache):
    calib = make_calib(tokenizer, tiny_t5(num_layers=4, seed=2))
    target = 0.35
    order, scores = greedy(calib, target)
    plan = skrr(beam_width=1, reuse=False, prefix_cache=prefix_cache).search(calib, target)
    assert plan.meta["order"] == order and plan.skipped == tuple(sorted(order))
    assert plan.meta["search"]["round_best"] == pytest.approx(scores, rel=1e-6)
    assert all(len(beams) == 1 for beams in plan.meta["search"]["beams"])


def interacting_t5():
    """Units 1 and 3 are the same FFN (harmless alone, harmful together: their effects add up); units 5 and 7
    are opposite FFNs (each harmful alone, nearly harmless together); the attention units matter a lot."""
    enc = tiny_t5(num_layers=4, seed=0)
    block = enc.encoder.block
    with torch.no_grad():
        for b in block:
            b.layer[0].SelfAttention.o.weight.mul_(0.5)
        for src, dst, scale, sign in ((0, 1, 0.05, 1.0), (2, 3, 0.12, -1.0)):
            ff_src, ff_dst = block[src].layer[1].DenseReluDense, block[dst].layer[1].DenseReluDense
            ff_src.wo.weight.mul_(scale)
            for name in ("wi_0", "wi_1", "wo"):
                getattr(ff_dst, name).weight.copy_(getattr(ff_src, name).weight)
            ff_dst.wo.weight.mul_(sign)
            block[dst].layer[1].layer_norm.weight.copy_(block[src].layer[1].layer_norm.weight)
    return enc


def test_beam_search_finds_the_pair_greedy_misses(tokenizer):
    enc = interacting_t5()
    calib = make_calib(tokenizer, enc, num_prompts=4, projection=False)
    d = {s: calib.discrepancy(PruningPlan.from_skips(calib.identity.encoder, s))
         for s in [(1,), (3,), (5,), (7,), (1, 3), (5, 7)]}
    assert d[(1, 3)] > d[(1,)] + d[(3,)]  # harmless alone, harmful together (what greedy walks into)
    assert d[(5, 7)] < min(d[(5,)], d[(7,)])  # harmful alone, harmless together (what the beam keeps)
    target = share(enc, [1, 3])
    greedy_plan = skrr(beam_width=1, reuse=False).search(calib, target)
    beam_plan = skrr(beam_width=3, reuse=False).search(calib, target)
    assert greedy_plan.skipped == (1, 3) and beam_plan.skipped == (5, 7)
    d_greedy, d_beam = calib.discrepancy(greedy_plan), calib.discrepancy(beam_plan)
    assert d_greedy > d_beam
    assert beam_plan.meta["search"]["path_scores"][beam_plan.meta["prefix"] - 1] == pytest.approx(d_beam, rel=1e-6)


def test_beam_rounds_follow_algorithm_1(tokenizer):
    """Each round keeps the k lowest distinct sets over all expansions of all beams; a set reached from several
    beams keeps the order from the best of them; ties between sets by ordered list."""
    calib = make_calib(tokenizer, tiny_t5(num_layers=3, seed=3))
    k, rounds = 2, 3
    result = skip_phase(calib, beam_width=k, max_rounds=rounds, prefix_cache=True, progress=False)
    sig, n = calib.identity.encoder, calib.identity.num_positions
    beams = [()]
    for r in range(rounds):
        cands = {}
        for b in beams:  # best beam first: the first order reached for a set is kept
            for u in range(n):
                if u not in b:
                    cands.setdefault(frozenset(b + (u,)), b + (u,))
        scored = sorted((calib.discrepancy(PruningPlan.from_skips(sig, o)), o) for o in cands.values())
        beams = [o for _, o in scored[:k]]
        assert [b.order for b in result.rounds[r]] == beams
        assert [b.score for b in result.rounds[r]] == pytest.approx([s for s, _ in scored[:k]], rel=1e-6)
    assert result.order == list(beams[0]) and len(result.rounds) == rounds


def same_set_t5():
    """FFNs of blocks 0 and 1 (units 1 and 3) nearly harmless, unit 3 the least: round 1 ranks (3,) above (1,),
    and {1, 3} is the best set of round 2, reached as (3, 1) from the better parent and as (1, 3)."""
    enc = tiny_t5(num_layers=4, seed=0)
    with torch.no_grad():
        enc.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(0.1)
        enc.encoder.block[1].layer[1].DenseReluDense.wo.weight.mul_(0.05)
    return enc


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_same_set_candidates_keep_the_better_history(tokenizer, prefix_cache):
    enc = same_set_t5()
    calib = make_calib(tokenizer, enc, num_prompts=4, projection=False)
    d = {s: calib.discrepancy(PruningPlan.from_skips(calib.identity.encoder, s)) for s in [(1,), (3,)]}
    assert d[(3,)] < d[(1,)]
    plans = skrr(beam_width=2, reuse=False, prefix_cache=prefix_cache).search_many(
        calib, [share(enc, [3]), share(enc, [1, 3])])
    one, two = plans.values()
    assert one.meta["order"][:2] == [3, 1]  # the lexicographic rule made it (1, 3): block 0's FFN alone
    assert one.skipped == (3,) and two.skipped == (1, 3)
    assert one.meta["settings"]["merge_same_set"] is True
    # The literal Alg. 1 keeps both orders of the set as two beams (stable sort: the better parent's first).
    literal = skip_phase(calib, beam_width=2, max_rounds=2, prefix_cache=prefix_cache, progress=False,
                         merge_same_set=False)
    assert [b.order for b in literal.rounds[1]] == [(3, 1), (1, 3)]
    assert literal.rounds[1][0].score == literal.rounds[1][1].score
    literal_plan = skrr(beam_width=2, reuse=False, prefix_cache=prefix_cache, merge_same_set=False).search(
        calib, share(enc, [3]))
    assert literal_plan.meta["settings"]["merge_same_set"] is False


CONFIGS = [{}, {"token_mask": True, "max_length": 64}, {"metric": "cosine"},
           {"metric": "cosine", "token_mask": True, "max_length": 64}, {"null_prompt": False, "projection": False}]


@pytest.mark.parametrize("gib", [4.0, 0.0])  # beam states kept across rounds, or recomputed each round
@pytest.mark.parametrize("kw", CONFIGS)
def test_prefix_cache_gives_the_same_plans(tokenizer, kw, gib):
    calib = make_calib(tokenizer, tiny_t5(num_layers=4, seed=4), **kw)
    targets = [0.2, 0.4]
    fast = skrr(prefix_cache=True, max_tokens=4 * calib.max_length, state_cache_gib=gib).search_many(calib, targets)
    slow = skrr(prefix_cache=False).search_many(calib, targets)
    for s in targets:
        assert fast[s] == slow[s], (fast[s].summary(), slow[s].summary())
        a, b = fast[s].meta, slow[s].meta
        assert a["order"] == b["order"]
        assert [[x["order"] for x in r] for r in a["search"]["beams"]] == \
            [[x["order"] for x in r] for r in b["search"]["beams"]]
        assert a["search"]["round_best"] == pytest.approx(b["search"]["round_best"], rel=1e-5, abs=1e-12)
        assert a["reuse"]["d_after"] == pytest.approx(b["reuse"]["d_after"], rel=1e-5, abs=1e-12)
        assert [x["choice"] for x in a["reuse"]["steps"]] == [x["choice"] for x in b["reuse"]["steps"]]


def test_beam_states_save_work_and_fall_back_beyond_their_budget(tokenizer, caplog):
    calib = make_calib(tokenizer, tiny_t5(num_layers=6, seed=6), num_prompts=4)
    work, plans = {}, {}
    small = calib.state_bytes() / 2 ** 30  # fits one hidden state, not a beam's: only a few candidate states
    for gib in (4.0, 0.0, small):
        calib.stats = type(calib.stats)()
        with caplog.at_level(logging.INFO, logger="skrr"):
            plans[gib] = skrr(state_cache_gib=gib).search(calib, 0.4)
        work[gib] = calib.stats.token_evals
    assert plans[4.0] == plans[0.0] == plans[small]
    assert work[4.0] < 0.8 * work[0.0]  # each beam's trunk is not recomputed every round
    assert work[4.0] < work[small] < work[0.0]
    assert "would pass state_cache_gib" in caplog.text
    assert "kept candidate states reached their budget" in caplog.text


def test_restart_positions():
    beam = np.array([1, 2, 0, 4, 5])  # slot codes: the beam skips position 2
    candidates = np.array([[1, 0, 3, 4, 5],  # the beam with 1 skipped (not 2) agrees with it on [0, 2)
                           [0, 2, 3, 4, 0],
                           [1, 2, 3, 0, 5],  # it runs 2 where the beam skips it
                           [1, 7, 3, 4, 5],  # another module at 1 (a re-use slot), not a skip
                           [1, 2, 0, 4, 5],  # the beam itself
                           [1, 2, 0, 0, 5]])  # one difference: the next-round candidate itself
    assert restart_positions(candidates, beam).tolist() == [2, 2, -1, -1, -1, -1]


def test_next_round_restarts_from_kept_candidate_states_exactly(tokenizer):
    """Round 2 of the beam search with the states kept in round 1: same D as full forwards, less work; the new
    beams' states are assembled from what was kept while they were scored."""
    calib = make_calib(tokenizer, tiny_t5(num_layers=4, seed=7), num_prompts=6)
    sig, n = calib.runner.signature, calib.identity.num_positions
    plan = lambda order: PruningPlan.from_skips(sig, order, "unit", "skrr")  # noqa: E731
    kept = RestartStates(2 ** 30)
    root = calib.prefix_states(calib.identity)
    first = expand([Beam((), 0.0)], n)
    scores = calib.discrepancies([plan(o) for o in first], keep=3, bases=[root], restarts=kept)
    beams = sorted((d, o) for d, o in zip(scores, first) if d is not None)[:3]
    kept.advance([plan_keys(plan(o)) for _, o in beams])
    assert kept.previous and kept.bytes > 0
    second = [plan(o) for o in expand([Beam(o, d) for d, o in beams], n)]
    order = list(calib._prompt_error)
    out, work, bases = {}, {}, {}
    for restarts in (None, kept):
        calib.stats, calib._prompt_error = ScoreStats(), list(order)
        bases[restarts is None] = [calib.prefix_states(plan(o), root, restarts=restarts) for _, o in beams]
        work["beams", restarts is None] = calib.stats.token_evals
        out[restarts is None] = calib.discrepancies(second, bases=bases[restarts is None], restarts=restarts)
        work[restarts is None] = calib.stats.token_evals - work["beams", restarts is None]
    assert work["beams", False] * (len(calib.prompts) + 1) == work["beams", True]  # only ∅ ran
    assert work[False] < 0.8 * work[True]
    for a, b in zip(bases[False], bases[True]):
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.states, b.states))
    assert out[False] == pytest.approx(out[True], rel=1e-6)
    assert out[False] == pytest.approx([calib.discrepancy(p) for p in second], rel=1e-6)


def test_new_beam_states_recompute_only_the_prompts_not_kept(tokenizer):
    """A beam that restarted past some positions on some prompts (RestartStates) has no kept state there for
    those prompts: only those rows (and ∅) are recomputed, the kept ones are copied, and the states are the
    plan's (the old rule recomputed every prompt from the first position with one missing)."""
    calib = make_calib(tokenizer, tiny_t5(num_layers=4, seed=9), num_prompts=6)
    sig, n, prompts = calib.runner.signature, calib.identity.num_positions, 6
    plan = lambda order: PruningPlan.from_skips(sig, order, "unit", "skrr")  # noqa: E731
    kept, root, beams = RestartStates(2 ** 30), calib.prefix_states(calib.identity), [Beam((), 0.0)]
    for _ in range(3):  # three rounds of the Skip phase, as skip_phase runs them
        held = [calib.prefix_states(plan(b.order), root, restarts=kept) for b in beams]
        cands = expand(beams, n)
        scores = calib.discrepancies([plan(o) for o in cands], keep=3, bases=held, restarts=kept)
        beams = [Beam(o, d) for d, o in sorted((d, o) for d, o in zip(scores, cands) if d is not None)[:3]]
        kept.advance([plan_keys(plan(b.order)) for b in beams])
    work, partly = {True: 0, False: 0}, False
    for beam in beams:
        parent = calib.prefix_states(plan(beam.order[:2]), root)  # its parent beam's states
        keys = plan_keys(plan(beam.order))
        start = parent.start(keys)
        covered = [sum(k in e.rows for k in range(prompts)) if (e := kept.previous.get(tuple(keys[:p]))) else 0
                   for p in range(start + 1, n + 1)]
        partly |= any(0 < c < prompts for c in covered)
        states = {}
        for restarts in (kept, None):
            calib.stats = ScoreStats()
            states[restarts is kept] = calib.prefix_states(plan(beam.order), parent, restarts=restarts).states
            work[restarts is kept] += calib.stats.token_evals
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states[True], states[False]))
        runs = [keys[p] is not None for p in range(start, n)]
        assert calib.stats.token_evals == sum((prompts + 1) * 32 for r in runs if r)
        expected = sum((prompts + 1 - c) * 32 for c, r in zip(covered, runs) if r)  # kept rows are copied
        work["expected"] = work.get("expected", 0) + expected
    assert partly  # the case this test is about: a position kept for some prompts only
    assert work[True] == work["expected"] < work[False]


def test_search_is_deterministic_and_serves_every_sparsity(tokenizer):
    calib = make_calib(tokenizer, tiny_t5(num_layers=4, seed=5))
    targets = [0.1, 0.25, 0.35]
    one = skrr(reuse=False).search_many(calib, targets)
    two = skrr(reuse=False).search_many(calib, targets)
    prefixes = []
    for s in targets:
        assert one[s] == two[s] and one[s].meta["search"]["beams"] == two[s].meta["search"]["beams"]
        meta = one[s].meta
        assert meta["target_sparsity"] == s and meta["realized_sparsity"] >= s - 5e-4
        assert share(calib.encoder, meta["order"][:meta["prefix"] - 1]) < s - 5e-4  # shortest prefix
        assert meta["order"] == one[targets[-1]].meta["order"]  # one search, one path
        assert meta["beam_width"] == 3 and meta["calib"] == calib.settings()
        prefixes.append(meta["prefix"])
    assert prefixes == sorted(prefixes)
    assert len(one[0.1].meta["order"]) == 4 == one[0.1].meta["search"]["rounds"]  # half of the 8 units


def test_the_path_does_not_depend_on_the_other_targets(tokenizer):
    """A target's plan is the same alone and beside a larger target (the old search stopped at the largest
    target: alone, unit 1 (round 1's best), beside 2 FFNs, unit 5 (a prefix of round 2's best (5, 7)))."""
    enc = interacting_t5()
    calib = make_calib(tokenizer, enc, num_prompts=4, projection=False)
    s1, s2 = share(enc, [1]), share(enc, [1, 3])
    alone = skrr(beam_width=3).search_many(calib, [s1])[s1]
    both = skrr(beam_width=3).search_many(calib, [s1, s2])
    assert alone == both[s1] and alone.reused == both[s1].reused and alone.skipped == both[s1].skipped
    assert alone.meta["order"] == both[s2].meta["order"] and alone.meta["search"]["rounds"] == 4


def test_max_rounds_and_unreachable_targets(tokenizer):
    calib = make_calib(tokenizer, tiny_t5(num_layers=3, seed=6))
    plan = skrr(reuse=False, max_rounds=4).search(calib, 0.1)
    assert plan.meta["search"]["rounds"] == 4 and len(plan.meta["order"]) == 4
    with pytest.raises(SparsityError, match="lower the sparsity"):
        skrr().search(calib, 0.99)  # the embedding alone is more than 1 %
    # 3 rounds (half of 6 units) cannot reach 60 %, all 6 units can: the message names method.max_rounds.
    assert share(calib.encoder, range(6)) > 0.6
    with pytest.raises(SparsityError, match=r"method\.max_rounds") as err:
        skrr().search(calib, 0.6)
    assert "\n" not in str(err.value)
    # The path itself falls short (reachable by the 3 largest units, not by this path's 3).
    path = skrr(reuse=False).search(calib, 0.1).meta["order"]
    short = share(calib.encoder, path) + 1e-3
    assert short < share(calib.encoder, sorted(range(6), key=lambda u: -share(calib.encoder, [u]))[:3])
    with pytest.raises(SparsityError, match=r"the best path of 3 rounds.*method\.max_rounds"):
        skrr(reuse=False).search(calib, short)
    assert skrr(reuse=False, max_rounds=6).search(calib, 0.6).meta["realized_sparsity"] >= 0.6 - 5e-4
    with pytest.raises(ValueError, match="max_rounds"):
        skrr(max_rounds=0)
    dense = skrr().search(calib, 0.0)
    assert dense.is_identity and dense.meta["realized_sparsity"] == 0.0


def test_block_only_encoders_are_searched_in_blocks():
    class WordTokenizer:
        """Deterministic word -> id map for the tiny BERT (vocab 100), padded to max_length."""

        def __call__(self, texts, padding, max_length, truncation, add_special_tokens, return_tensors):
            ids = torch.zeros(len(texts), max_length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, t in enumerate(texts):
                toks = [1] + [3 + sum(map(ord, w)) % 90 for w in t.split()][:max_length - 2] + [2]
                ids[r, :len(toks)] = torch.tensor(toks)
                mask[r, :len(toks)] = 1
            return type("Tok", (), {"input_ids": ids, "attention_mask": mask})

    enc = tiny_bert(num_layers=4, seed=0)
    calib = CalibrationSet(enc, WordTokenizer(), PROMPTS[:3], None, use_projection=False, max_length=24)
    plans = {pc: skrr(prefix_cache=pc).search(calib, 0.3) for pc in (True, False)}
    assert plans[True] == plans[False]
    assert plans[True].granularity == "block" and plans[True].skipped


# ----------------------------------------------------------------------------------------------- Re-use phase
def reuse_by_hand(calib, plan):
    """Algorithm 2 written out with calib.discrepancy (ascending order, strict improvement)."""
    kept = [j for j, s in enumerate(plan.slots) if s is not None and s.source == j]
    current = plan
    for i in [i for i, s in enumerate(plan.slots) if s is None]:
        kind = part_of(i, plan.granularity)
        same = [j for j in kept if part_of(j, plan.granularity) == kind]
        left = max((j for j in same if j < i), default=None)
        right = min((j for j in same if j > i), default=None)
        d_m = calib.discrepancy(current)
        d_l = calib.discrepancy(current.with_slots({i: Slot(left, kind)})) if left is not None else float("inf")
        d_r = calib.discrepancy(current.with_slots({i: Slot(right, kind)})) if right is not None else float("inf")
        if d_l < d_m and d_l < d_r:
            current = current.with_slots({i: Slot(left, kind)})
        elif d_r < d_m and d_r < d_l:
            current = current.with_slots({i: Slot(right, kind)})
    return current


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_reuse_is_algorithm_2_never_worse_and_adds_no_parameters(tokenizer, prefix_cache):
    enc = tiny_t5(num_layers=6, seed=0)
    calib = make_calib(tokenizer, enc, num_prompts=4, max_length=48)
    skip = skrr(reuse=False).search(calib, 0.4)
    reused = reuse_phase(calib, skip, prefix_cache=prefix_cache)
    assert reused.reused, "the case must exercise re-use"
    assert reused == reuse_by_hand(calib, skip)
    assert all(part_of(i, "unit") == part_of(j, "unit") for i, j in reused.reused.items())
    d_skip, d_reuse = calib.discrepancy(skip), calib.discrepancy(reused)
    assert d_reuse < d_skip
    meta = reused.meta["reuse"]
    assert meta["d_before"] == pytest.approx(d_skip, rel=1e-6) and meta["d_after"] == pytest.approx(d_reuse, rel=1e-6)
    assert count_params(apply_plan(enc, reused)) == count_params(apply_plan(enc, skip))
    assert reused.dropped == skip.dropped and reused.meta["realized_sparsity"] == skip.meta["realized_sparsity"]
    # Through the method too: reuse=True is the skip plan followed by the same Re-use phase.
    assert skrr(reuse=True, prefix_cache=prefix_cache).search(calib, 0.4) == reused


def test_reuse_in_skip_order_and_on_block_plans(tokenizer):
    enc = tiny_t5(num_layers=6, seed=0)
    calib = make_calib(tokenizer, enc, num_prompts=4, max_length=48)
    skip = skrr(reuse=False).search(calib, 0.4)
    in_order = reuse_phase(calib, skip, order="skip")
    assert [s["position"] for s in in_order.meta["reuse"]["steps"]] == skip.meta["order"][:skip.meta["prefix"]]
    assert in_order.meta["reuse"]["d_after"] <= in_order.meta["reuse"]["d_before"]
    # A ShortGPT-style block plan on a unit calibration set: l/r are the nearest kept blocks.
    blocks = PruningPlan.from_skips(calib.identity.encoder, [2, 3], "block", "shortgpt", {"order": [3, 2]})
    plan = reuse_phase(calib, blocks)
    assert plan.granularity == "block" and plan.dropped == (2, 3)
    for i, j in plan.reused.items():
        assert j in ((1, 4) if i in (2, 3) else ())
    assert plan.meta["reuse"]["d_after"] <= plan.meta["reuse"]["d_before"]
    with pytest.raises(ValueError):
        reuse_phase(calib, skip, order="random")


# ----------------------------------------------------------------------------------------------- wiring
def test_config_builds_the_paper_defaults():
    from omegaconf import OmegaConf

    from skrr.experiments.methods import method_from_config

    _, method = method_from_config(OmegaConf.load(ROOT / "configs" / "method" / "skrr.yaml"))
    assert isinstance(method, Skrr) and method.name == "skrr"
    assert method.settings() == {"beam_width": 3, "reuse": True, "reuse_order": "ascending", "max_rounds": None,
                                 "merge_same_set": True}
    assert method.prefix_cache is True


def test_bench_refuses_paper_scale_without_gpu(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bench = load_bench(monkeypatch)
    assert bench.main(["--paper-scale"]) != 0
    err = capsys.readouterr().err.strip()
    assert "GPU" in err and "\n" not in err


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "scripts" / "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_search", bench)
    spec.loader.exec_module(bench)
    return bench


def test_bench_compares_both_searches(capsys, monkeypatch):
    bench = load_bench(monkeypatch)
    assert bench.main(["--layers", "3", "--d-model", "32", "--prompts", "2", "--max-length", "16",
                       "--sparsity", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "identical plans" in out and "fewer encoder token-evaluations" in out and "wall clock" in out
    assert "scoring peak" in out
    # --work-only reports the closed-form count, which the side-by-side run above checked against the measured one.
    assert bench.main(["--layers", "3", "--d-model", "32", "--prompts", "2", "--max-length", "16",
                       "--sparsity", "0.3", "--work-only", "--oracle-bound"]) == 0
    out = capsys.readouterr().out
    assert "closed form, not run" in out and "prefix_cache=False" not in out
    assert "bound known from the start" in out and "(same beams)" in out  # a bound given in advance: same beams


def test_bench_paper_scale_path_runs_on_small_shapes(capsys, monkeypatch):
    # The GPU estimate's code path, on CPU with tiny shapes (the real run needs T5-XXL on a GPU).
    bench = load_bench(monkeypatch)
    args = bench.parse_args(["--paper-scale", "--prompts", "2", "--max-length", "16", "--naive-evals", "1"])
    arch = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 3, "vocab_size": 100}
    assert bench.paper_scale(args, arch, device="cpu") == 0
    out = capsys.readouterr().out
    assert "round 2:" in out and "estimated 1k prompts" in out and "kept across rounds" in out
    assert "rounds 1-2:" in out and "token-evaluations" in out and "scoring peak" in out


@pytest.mark.parametrize("seed,size", [(0, 2), (2, 3)])  # (2, 3): one of the 3 lowest is not among the race's
def test_a_beam_race_keeps_the_k_lowest_and_their_exact_scores(tokenizer, seed, size):  # 6 best on ∅
    """discrepancies(keep=k): whatever the schedule (∅ race, plans finished early to tighten the bound), the k
    lowest D are returned, each exactly as discrepancy() computes it, and only provably worse plans are None."""
    calib = make_calib(tokenizer, tiny_t5(num_layers=6, seed=seed), num_prompts=8)
    n = calib.identity.num_positions
    plans = [PruningPlan.from_skips(calib.identity.encoder, c) for c in itertools.combinations(range(n), size)]
    full = [calib.discrepancy(p) for p in plans]
    got = calib.discrepancies(plans, keep=3)
    lowest = sorted(range(len(plans)), key=lambda i: full[i])[:3]
    assert all(got[i] is not None for i in lowest)
    kept = [i for i, d in enumerate(got) if d is not None]
    assert [got[i] for i in kept] == pytest.approx([full[i] for i in kept], rel=1e-6)
    assert all(full[i] > full[lowest[-1]] for i, d in enumerate(got) if d is None)
    assert len(kept) < len(plans) // 2  # the race did drop plans
