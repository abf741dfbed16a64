"""Calibration: prompt files, seeded sampling, hashing, the discrepancy D (SPEC §2) and its fast exact path."""
import random

import pytest
import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection

from skrr import PlanError, PruningPlan, Slot, identity_plan
from skrr.calib import (DEFAULT_PROMPTS, CalibrationError, CalibrationSet, RestartStates, load_prompts, prompt_hash,
                        sample_prompts)
from skrr.tiny import tiny_t5, tiny_t5_tokenizer

PROMPTS = load_prompts(DEFAULT_PROMPTS)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_t5_tokenizer()


def make_calib(tokenizer, encoder=None, prompts=PROMPTS[:5], max_length=48, **kw):
    encoder = encoder if encoder is not None else tiny_t5(num_layers=3, seed=0)
    torch.manual_seed(0)
    projection = PixArtAlphaTextProjection(in_features=encoder.config.d_model, hidden_size=24)
    kw.setdefault("batch_size", 2)
    return CalibrationSet(encoder, tokenizer, prompts, projection, max_length=max_length, **kw)


def random_plans(calib, n=12, seed=0):
    """Skip plans of 1-3 positions and a few re-use plans."""
    rng = random.Random(seed)
    sig, size = calib.identity.encoder, calib.identity.num_positions
    plans = [PruningPlan.from_skips(sig, rng.sample(range(size), rng.randint(1, 3))) for _ in range(n)]
    plans.append(PruningPlan.from_skips(sig, [2]).with_slots({2: Slot(0, "attn")}))
    plans.append(PruningPlan.from_skips(sig, [1, 4]).with_slots({1: Slot(3, "ffn")}))
    return plans


# ----------------------------------------------------------------------------------------------- prompt files
def test_prompts_from_txt_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a red car\n\n  a blue bird  \n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a red car"}\n\n{"caption": "a blue bird"}\n')
    (tmp_path / "p.csv").write_text('id,text,other\n1,"a red car",x\n2,a blue bird,y\n')
    (tmp_path / "q.csv").write_text("id,words\n1,a red car\n2,a blue bird\n")
    want = ["a red car", "a blue bird"]
    assert load_prompts(tmp_path / "p.txt") == want
    assert load_prompts(tmp_path / "p.jsonl") == want
    assert load_prompts(tmp_path / "p.csv") == want
    assert load_prompts(tmp_path / "q.csv", column="words") == want
    assert len(PROMPTS) >= 32 and all(PROMPTS)  # the shipped default file


@pytest.mark.parametrize("content,suffix,match", [
    (None, ".txt", "does not exist"),
    ("\n \n", ".txt", "holds no prompts"),
    ('{"caption": "ok"}\n{not json\n', ".jsonl", "not valid JSON"),
    ("id,words\n1,a car\n", ".csv", "no column"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, suffix, match):
    path = tmp_path / f"prompts{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as err:
        load_prompts(path)
    assert "\n" not in str(err.value)


def test_seeded_sampling():
    prompts = [f"prompt {i}" for i in range(100)]
    a = sample_prompts(prompts, 10, seed=0)
    assert a == sample_prompts(prompts, 10, seed=0)
    assert a != sample_prompts(prompts, 10, seed=1)
    assert len(set(a)) == 10 and a == sorted(a, key=prompts.index)  # file order kept
    assert sample_prompts(prompts, None, seed=0) == prompts == sample_prompts(prompts, 500, seed=3)
    with pytest.raises(CalibrationError):
        sample_prompts(prompts, 0, seed=0)


def test_hash_follows_the_prompts(tokenizer):
    assert prompt_hash(["a", "b"]) == prompt_hash(["a", "b"])
    assert prompt_hash(["a", "b"]) != prompt_hash(["b", "a"]) != prompt_hash(["a", "c"])
    calib = make_calib(tokenizer, prompts=PROMPTS[:3])
    other = make_calib(tokenizer, prompts=PROMPTS[1:4])
    assert calib.hash == prompt_hash(PROMPTS[:3]) != other.hash
    assert calib.settings()["prompt_hash"] == calib.hash and calib.settings()["num_prompts"] == 3


# ----------------------------------------------------------------------------------------------- discrepancy
def test_padding_and_dense_cache(tokenizer):
    calib = make_calib(tokenizer, max_length=96)
    assert [b.input_ids.shape for b in calib.batches] == [(2, 96), (2, 96), (1, 96)]
    assert not calib.batches[0].attention_mask.all()  # padded as the pipeline pads
    assert calib.null_batch.attention_mask.sum() == 1  # ∅ is just </s>
    assert calib.dense[0].shape == (2, 96, 24)  # projected features, cached


@pytest.mark.parametrize("kw", [{}, {"metric": "cosine"}, {"token_mask": True}, {"null_prompt": False}])
def test_identity_scores_zero_and_skips_do_not(tokenizer, kw):
    calib = make_calib(tokenizer, **kw)
    assert calib.discrepancy(calib.identity) == 0.0
    assert calib.discrepancy(calib.identity.with_slots({3: None})) > 0


def test_discrepancy_is_the_paper_formula(tokenizer):
    calib = make_calib(tokenizer, prompts=PROMPTS[:3])
    plan = calib.identity.with_slots({1: None, 4: None})
    enc, proj = calib.encoder, calib.projection
    from skrr import apply_plan

    pruned = apply_plan(enc, plan)

    def feats(model, texts):
        tok = tokenizer(texts, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return proj(model(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state)

    mse = torch.mean((feats(enc, PROMPTS[:3]) - feats(pruned, PROMPTS[:3])) ** 2)
    mse_null = torch.mean((feats(enc, [""]) - feats(pruned, [""])) ** 2)
    assert calib.discrepancy(plan) == pytest.approx(float(mse + mse_null), rel=1e-5)


@pytest.fixture(scope="module")
def small_calib(tokenizer):
    return make_calib(tokenizer, prompts=PROMPTS[:2])


def whole_tensor_errors(metric, token_mask, dense, pruned, mask):
    """The per-prompt error sums written out on whole tensors (float32 copies, float64 copy of the errors)."""
    dense, pruned = dense.float(), pruned.float()
    if metric == "mse":
        err = (dense - pruned).pow(2)
        if token_mask:
            err = err * mask.unsqueeze(-1).float()
        return err.double().sum(dim=(-2, -1))
    cos = torch.nn.functional.cosine_similarity(dense, pruned, dim=-1, eps=1e-8)
    err = 1 - cos if not token_mask else (1 - cos) * mask.float()
    return err.double().sum(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric,token_mask", [("mse", False), ("mse", True), ("cosine", False), ("cosine", True)])
@pytest.mark.parametrize("piece", [None, 3 * 7 * 16, 50])  # whole tensor, whole plans, prompts of one plan
def test_row_errors_in_pieces_equal_the_whole_tensor_formula(small_calib, monkeypatch, dtype, metric, token_mask,
                                                              piece):
    import skrr.calib as calib_module

    calib = small_calib
    monkeypatch.setattr(calib, "metric", metric)
    monkeypatch.setattr(calib, "token_mask", token_mask)
    if piece:
        monkeypatch.setattr(calib_module, "ERROR_PIECE", piece)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 7, 16, generator=g).to(dtype)
    pruned = (dense.float() + 0.3 * torch.randn(5, 2, 3, 7, 16, generator=g)).to(dtype)  # [plans..., N, L, d]
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    sums, count = calib.row_errors(dense, pruned, mask)
    want = whole_tensor_errors(metric, token_mask, dense, pruned, mask)
    assert sums.shape == (5, 2, 3) and sums.dtype == torch.float64
    if metric == "mse":
        assert torch.equal(sums, want)  # bit for bit: same float32 errors, same float64 sums
        assert count == (int(mask.sum()) * 16 if token_mask else 3 * 7 * 16)
    else:  # the code's 1 - cos is |a/|a| - b/|b||^2 / 2 (never negative): equal up to rounding
        torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
        assert count == (int(mask.sum()) if token_mask else 3 * 7)
    assert torch.equal(calib.row_errors(dense, pruned[0, 0], mask)[0], sums[0, 0])  # no plan dims
@pytest.mark.parametrize("kw", [{"metric": "cosine"}, {"token_mask": True}, {"use_projection": False}])
def test_ablation_flags_are_their_formulas_by_hand(tokenizer, kw):
    # Table A13's ablations, written out from the encoder outputs (no CalibrationSet arithmetic):
    # cosine = mean over tokens of 1 - cos; token_mask = MSE over valid tokens only; no projection = raw E(c).
    from skrr import apply_plan

    calib = make_calib(tokenizer, prompts=PROMPTS[:3], **kw)
    plan = calib.identity.with_slots({1: None, 4: None})
    pruned = apply_plan(calib.encoder, plan)
    proj = calib.projection if kw.get("use_projection", True) else (lambda h: h)

    def term(texts):
        tok = tokenizer(texts, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
        with torch.no_grad():
            a, b = (proj(m(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state).double()
                    for m in (calib.encoder, pruned))
        if kw.get("metric") == "cosine":
            return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()
        if kw.get("token_mask"):
            valid = tok.attention_mask.bool()
            return ((a - b) ** 2)[valid].mean()
        return ((a - b) ** 2).mean()

    expected = float(term(PROMPTS[:3]) + term([""]))
    assert calib.discrepancy(plan) == pytest.approx(expected, rel=1e-4)
    assert calib.discrepancies([plan])[0] == pytest.approx(expected, rel=1e-4)


def test_null_prompt_flag_adds_the_empty_prompt_term(tokenizer):
    plan_skips = {2: None, 5: None}
    with_null = make_calib(tokenizer, null_prompt=True)
    without = make_calib(tokenizer, null_prompt=False)
    plan = with_null.identity.with_slots(plan_skips)
    d_with, d_without = with_null.discrepancy(plan), without.discrepancy(plan)
    null_only = with_null._mean_distance(
        [with_null.features(with_null.runner.forward(plan, with_null.null_batch.input_ids,
                                                     with_null.null_batch.attention_mask))],
        [with_null.dense_null], [with_null.null_batch])
    assert null_only > 0 and d_with == pytest.approx(d_without + null_only, rel=1e-12)
    assert without.null_batch is None and "null_prompt" in without.settings()


def test_batching_does_not_change_d(tokenizer):
    calibs = [make_calib(tokenizer, batch_size=b) for b in (1, 2, 5)]
    plan = calibs[0].identity.with_slots({1: None, 4: None})
    values = [c.discrepancy(plan) for c in calibs]
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[1] == pytest.approx(values[2], rel=1e-6)


def test_plan_of_another_encoder_is_refused(tokenizer):
    calib = make_calib(tokenizer)
    with pytest.raises(PlanError):
        calib.discrepancy(identity_plan(tiny_t5(num_layers=2)))
    with pytest.raises(PlanError):
        calib.discrepancies([identity_plan(tiny_t5(num_layers=2))])


# ----------------------------------------------------------------------------------------------- fast path
@pytest.mark.parametrize("kw", [{}, {"metric": "cosine"}, {"token_mask": True, "max_length": 96},
                                {"use_projection": False, "null_prompt": False},
                                {"token_mask": True, "metric": "cosine", "max_length": 96}])
def test_discrepancies_equal_discrepancy(tokenizer, kw):
    if kw.get("use_projection") is False:
        calib = CalibrationSet(tiny_t5(num_layers=3), tokenizer, PROMPTS[:5], None, max_length=48,
                               **{k: v for k, v in kw.items()})
    else:
        calib = make_calib(tokenizer, **kw)
    plans = random_plans(calib)
    slow = [calib.discrepancy(p) for p in plans]
    fast = calib.discrepancies(plans, max_tokens=3 * 48)  # a tight budget: several module calls per position
    assert fast == pytest.approx(slow, rel=1e-5, abs=1e-12)
    if not kw.get("token_mask"):
        assert fast == slow  # same rows, summed per prompt then exactly: bit-identical here
    # A plan equivalent to the dense one scores 0 on the fast path too; with token_mask exactly, because the
    # trimmed dense reference is the very same tree node.
    zero = calib.discrepancies([calib.identity])[0]
    assert zero == 0.0 if kw.get("token_mask") else zero < 1e-12


@pytest.mark.parametrize("num_prompts", [5, 64])  # 64: with a bound, two prompts share each module call
def test_discrepancies_abandon_only_plans_above_the_bound(tokenizer, num_prompts):
    calib = make_calib(tokenizer, prompts=PROMPTS[:num_prompts], max_length=24, batch_size=16)
    plans = random_plans(calib, n=20, seed=1)
    full = calib.discrepancies(plans)
    assert full == pytest.approx([calib.discrepancy(p) for p in plans], rel=1e-6)
    bound = sorted(full)[6]
    before = calib.stats.abandoned
    bounded = calib.discrepancies(plans, bound)
    assert calib.stats.abandoned - before == sum(v is None for v in bounded) > 0
    for d, b in zip(full, bounded):
        assert (b is None and d > bound) or b == pytest.approx(d, rel=1e-12)
    # Every plan whose D is within the bound is returned.
    assert sum(v is not None for v in bounded) >= 7


def test_fast_path_does_less_work(tokenizer):
    calib = make_calib(tokenizer)
    plans = [calib.identity.with_slots({u: None}) for u in range(calib.identity.num_positions)]
    calib.stats.token_evals = 0
    for p in plans:
        calib.discrepancy(p)
    slow = calib.stats.token_evals
    calib.stats.token_evals = 0
    calib.discrepancies(plans)
    # Sharing prefixes: the dense trunk once + each candidate's suffix, about half of the full passes.
    assert calib.stats.token_evals < 0.7 * slow


def test_prompts_are_visited_largest_error_first(tokenizer):
    """Early abandon visits the prompts with the largest errors of the last call first; with candidate states
    kept across rounds (RestartStates), in one order, that of each prompt's first error (the kept states cover
    the prompts a candidate was scored on: the next round must visit those first)."""
    calib = make_calib(tokenizer, prompts=PROMPTS[:8], max_length=24, batch_size=16)
    order = lambda: [k for c in calib._chunks(lambda: 1) for k in c.indices]  # noqa: E731
    assert order() == [-1, *range(8)]  # nothing scored yet: in file order
    last = calib.identity.num_positions - 1
    plans = [calib.identity.with_slots({last: None}), calib.identity.with_slots({0: None, 1: None})]

    def ranked(plan):
        errors = calib.row_errors(calib.dense[0], calib.encode(plan)[0], calib.batches[0].attention_mask)[0]
        return [-1, *sorted(range(8), key=lambda k: -errors[k].item())]

    assert ranked(plans[0]) != ranked(plans[1])  # other plans, other order
    calib.discrepancies(plans[:1], restarts=RestartStates(2 ** 20))
    assert order() == ranked(plans[0]) != [-1, *range(8)]
    calib.discrepancies(plans[1:], restarts=RestartStates(2 ** 20))
    assert order() == ranked(plans[0])  # kept
    calib.discrepancies(plans[1:])  # nothing kept across rounds: re-ranked
    assert order() == ranked(plans[1])


def test_prompt_order_is_the_race_finishers_mean_error(tokenizer):
    """In a beam race the order comes from the plans finished on every prompt (the 2k lowest on ∅), not from
    whichever plans were still alive when a prompt was visited (that ranked prompts by when they came)."""
    calib = make_calib(tokenizer, prompts=PROMPTS[:8], max_length=24, batch_size=16)
    plans = [calib.identity.with_slots({p: None}) for p in range(calib.identity.num_positions)]
    batch = calib.batches[0]

    def errors(plan, batch, dense, rows):
        return calib.row_errors(dense, calib._forward_features(plan, batch, rows), batch.attention_mask)[0]

    null = [errors(p, calib.null_batch, calib.dense_null, [-1]).item() for p in plans]
    finishers = sorted(range(len(plans)), key=lambda i: (null[i], i))[:2]  # keep=1: the 2 lowest on ∅
    mean = sum(errors(plans[i], batch, calib.dense[0], list(range(8))) for i in finishers) / 2
    calib.discrepancies(plans, keep=1)
    assert calib.stats.abandoned > 0  # others ran some prompts and were dropped
    order = [k for c in calib._chunks(lambda: 1) for k in c.indices]
    assert order == [-1, *sorted(range(8), key=lambda k: (-mean[k].item(), k))]


# ----------------------------------------------------------------------------------------------- stored states
def test_prefix_states_are_the_plan_hidden_states(tokenizer):
    calib = make_calib(tokenizer)
    n = calib.identity.num_positions
    skip = calib.identity.with_slots({1: None, 4: None})
    states = calib.prefix_states(skip)
    assert len(states.states) == n + 1 and states.states[0].shape[0] == len(PROMPTS[:5]) + 1  # prompts + ∅
    # The last state, finished, is the plan's output on every prompt and on ∅.
    out = calib.runner.finish(states.states[n])
    ids = torch.cat([b.input_ids for b in calib.batches] + [calib.null_batch.input_ids])
    mask = torch.cat([b.attention_mask for b in calib.batches] + [calib.null_batch.attention_mask])
    assert torch.allclose(out, calib.runner.forward(skip, ids, mask), atol=1e-6)
    # A skipped position passes its input on: the same tensor, no copy.
    assert states.states[2] is states.states[1] and states.states[5] is states.states[4]
    # Derived from a parent: the shared prefix is the parent's tensors, the rest is recomputed and equal.
    reuse = skip.with_slots({4: Slot(2, "attn")})
    derived = calib.prefix_states(reuse, states)
    assert states.start(derived.keys) == 4
    assert all(derived.states[p] is states.states[p] for p in range(5))
    fresh = calib.prefix_states(reuse)
    assert all(torch.equal(a, b) for a, b in zip(derived.states, fresh.states))


@pytest.mark.parametrize("kw", [{}, {"token_mask": True, "max_length": 96}, {"null_prompt": False}])
def test_discrepancies_from_stored_states(tokenizer, kw):
    calib = make_calib(tokenizer, **kw)
    plans = random_plans(calib, n=16, seed=2)
    bases = [calib.prefix_states(calib.identity), calib.prefix_states(calib.identity.with_slots({1: None}))]
    calib.stats.token_evals = 0
    plain = calib.discrepancies(plans)
    without = calib.stats.token_evals
    calib.stats.token_evals = 0
    stored = calib.discrepancies(plans, bases=bases)
    assert calib.stats.token_evals < 0.8 * without  # the stored prefixes are not run again
    assert stored == pytest.approx(plain, rel=1e-5, abs=1e-12)
    assert stored == pytest.approx([calib.discrepancy(p) for p in plans], rel=1e-5, abs=1e-12)
    # A plan equal to a base runs no unit (with token_mask neither does the dense reference on the cut input).
    calib.stats.token_evals = 0
    assert calib.discrepancies([calib.identity], bases=bases)[0] < 1e-12
    assert calib.stats.token_evals == 0


# seed 6: some of the keep lowest plans are not among the 2 x keep lowest on ∅, so the bound must come from the
# keep-th finished plan, not the best one (a mutant taking the best dropped plans that belong in the beam).
@pytest.mark.parametrize("seed, keep", [(3, 3), (6, 2)])
def test_keep_returns_the_lowest_and_drops_only_plans_above_them(tokenizer, seed, keep):
    calib = make_calib(tokenizer, prompts=PROMPTS[:6], max_length=24)
    plans = random_plans(calib, n=24, seed=seed)
    full = calib.discrepancies(plans)
    before = calib.stats.abandoned
    kept = calib.discrepancies(plans, keep=keep)
    assert calib.stats.abandoned - before == sum(v is None for v in kept) > 0
    kth = sorted(full)[keep - 1]
    for d, k in zip(full, kept):
        # Dropped: above keep others. Returned: the same D, and every plan among the keep lowest is returned.
        assert (k is None and d > kth) or k == pytest.approx(d, rel=1e-12)
    assert sorted(v for v in kept if v is not None)[:keep] == pytest.approx(sorted(full)[:keep], rel=1e-12)
