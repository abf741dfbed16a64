"""Skrr search: prefix-cached vs straightforward, side by side on the same inputs (issues 3 and 12).

    python scripts/bench_search.py                      # tiny 12-block T5 (d_model 256) on CPU, both searches, same plan
    python scripts/bench_search.py --layers 24 --d-model 32 --prompts 64   # the paper's 48 units and 24 rounds
    python scripts/bench_search.py --layers 24 --d-model 32 --prompts 64 --work-only   # the same work ratio, fast
    python scripts/bench_search.py --layers 24 --d-model 32 --prompts 1000 --work-only # the paper's 1k prompts
    python scripts/bench_search.py --paper-scale        # T5-v1.1-XXL shapes, random weights, GPU: cost estimate

The default run builds a tiny-but-deep T5 (12 blocks = 24 units, d_model 256: compute-bound, so the wall
ratio follows the work), a random PixArt caption projection and the first ``--prompts`` prompts of
skrr/data/calib_prompts.txt (past its 64, distinct synthetic ones: a shipped prompt with its words shuffled,
seeded by the index; the paper used 1k prompts), runs Skrr with ``prefix_cache=False`` (one full forward per
candidate) and ``prefix_cache=True`` for the same rounds (half the units, the paper's rule), asserts that both
return the same plans with the same scores and leads with the ratio of encoder token-evaluations (rows x tokens
over all module calls: hardware-independent), with the wall-clock ratio beside it. It ends with the memory peak of
scoring one module call's worth of stacked candidates: ``CalibrationSet.row_errors`` vs the same sums on
whole-tensor float32/float64 copies. ``--work-only`` runs the fast search alone and counts the straightforward
search's token-evaluations by its closed form (each candidate runs its kept units over every prompt and ∅),
which every side-by-side run checks against the measured count. ``--oracle-bound`` runs the Skip phase twice
more, once as it is and once with each round's bound known from the start, asserts the same beams and prints
both counts: what a better bound could still save. ``--state-cache-gib`` is the memory for
hidden states kept across rounds: each beam's, then candidate states the next round restarts from (the
line of the fast search prints their peak); 0 keeps none (same plan, more work).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from skrr.calib import DEFAULT_PROMPTS, MAX_TOKENS, CalibrationSet, ScoreStats, load_prompts  # noqa: E402
from skrr.method import STATE_CACHE_GIB, Beam, Skrr, default_rounds, expand, skip_phase  # noqa: E402

log = logging.getLogger("bench_search")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paper-scale", action="store_true", help="T5-v1.1-XXL architecture, random weights, GPU only")
    p.add_argument("--layers", type=int, default=12, help="tiny T5 blocks (2 units each); the search runs half the "
                                                           "units as rounds (24: the paper's 48 units, 24 rounds)")
    p.add_argument("--d-model", type=int, default=256, help="width (>= 256: compute-bound on a CPU core)")
    p.add_argument("--d-ff", type=int, default=None, help="FFN width (default 2 x d_model)")
    p.add_argument("--spread", type=float, default=0.0,
                   help="scale each unit's output projection by 10**U(-spread, 0): units of unequal importance, "
                        "as in trained encoders (0 = the plain random tiny T5, where all units look alike)")
    p.add_argument("--prompts", type=int, default=None, help="calibration prompts (default 8; paper scale 64); past "
                                                             "the 64 shipped ones, their words reshuffled")
    p.add_argument("--max-length", type=int, default=None, help="tokens per prompt, padded (default 32; paper "
                                                                 "scale 300, PixArt-Σ)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.3], help="target sparsities (prefixes of the "
                                                                             "one best path)")
    p.add_argument("--beam-width", type=int, default=3)
    p.add_argument("--no-reuse", action="store_true", help="time the Skip phase only")
    p.add_argument("--metric", default="mse", choices=["mse", "cosine"])
    p.add_argument("--token-mask", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared box)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="rows x tokens per module call")
    p.add_argument("--state-cache-gib", type=_gib, default=STATE_CACHE_GIB,
                   help="memory for hidden states kept across rounds: each beam's, then candidate states the "
                        "next round restarts from (0: keep none; same plan, more work)")
    p.add_argument("--rounds", type=int, default=2, help="paper-scale: Skip rounds to time")
    p.add_argument("--naive-evals", type=int, default=3, help="paper-scale: straightforward evaluations to time")
    p.add_argument("--work-only", action="store_true",
                   help="run the fast search only and count the straightforward search's token-evaluations by "
                        "its closed form (checked against the measured count in every side-by-side run)")
    p.add_argument("--oracle-bound", action="store_true",
                   help="run the Skip phase twice more, as it is and with each round's bound known from the start "
                        "(the k-th lowest D of that round, from the first run): what a better bound could still save")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = keep no beam states), got {text}")
    return value


# ----------------------------------------------------------------------------------------------- tiny, CPU
def tiny_calibration(args: argparse.Namespace) -> CalibrationSet:
    """Tiny deep T5 + random PixArt caption projection + ``--prompts`` prompts (calibration_prompts)."""
    from diffusers.models.embeddings import PixArtAlphaTextProjection

    from skrr.tiny import tiny_t5, tiny_t5_tokenizer

    encoder = tiny_t5(num_layers=args.layers, d_model=args.d_model, d_ff=args.d_ff, seed=args.seed)
    if args.spread:
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for block in encoder.encoder.block:
                for w in (block.layer[0].SelfAttention.o.weight, block.layer[1].DenseReluDense.wo.weight):
                    w.mul_(10 ** (-args.spread * torch.rand((), generator=g)))
    torch.manual_seed(args.seed)
    projection = PixArtAlphaTextProjection(in_features=args.d_model, hidden_size=2 * args.d_model)
    prompts = calibration_prompts(args.prompts)
    return CalibrationSet(encoder, tiny_t5_tokenizer(), prompts, projection, max_length=args.max_length,
                          metric=args.metric, token_mask=args.token_mask, batch_size=16)


def calibration_prompts(count: int) -> list[str]:
    """The first ``count`` prompts of the shipped file; past its end (the paper used 1k prompts), distinct
    synthetic ones: prompt i is shipped prompt i mod 64 with its words shuffled by a generator seeded with i
    (deterministic, same lengths and vocabulary)."""
    shipped = load_prompts(DEFAULT_PROMPTS)
    out = shipped[:count]
    for i in range(len(shipped), count):
        words = shipped[i % len(shipped)].split()
        random.Random(i).shuffle(words)
        out.append(" ".join(words))
    return out


def compare(args: argparse.Namespace) -> int:
    """Both searches on the same calibration set; assert equal plans; print the work and wall ratios."""
    torch.set_num_threads(args.threads)
    calib = tiny_calibration(args)
    units = 2 * args.layers
    print(f"tiny T5: {args.layers} blocks ({units} units, {default_rounds(units)} rounds), d_model {args.d_model}, "
          f"d_ff {args.d_ff}, unit spread {args.spread} decades; "
          f"{len(calib.prompts)} prompts + null, {args.max_length} tokens; metric {args.metric}, "
          f"token_mask {args.token_mask}; k={args.beam_width}; targets {args.sparsity}; "
          f"torch threads {args.threads}; beam states kept up to {args.state_cache_gib} GiB "
          f"({calib.state_bytes() * (units + 1) / 2 ** 20:.1f} MiB per beam)")
    runs: dict[bool, dict[str, Any]] = {}
    for cached in ((True,) if args.work_only else (False, True)):
        method = Skrr(beam_width=args.beam_width, reuse=not args.no_reuse, prefix_cache=cached,
                      progress=args.progress, max_tokens=args.max_tokens, state_cache_gib=args.state_cache_gib)
        calib.stats = ScoreStats()
        start = time.perf_counter()
        plans = method.search_many(calib, args.sparsity)
        seconds = time.perf_counter() - start
        runs[cached] = {"plans": plans, "seconds": seconds, "tokens": calib.stats.token_evals,
                        "evals": calib.stats.plans, "abandoned": calib.stats.abandoned}
        name = "prefix_cache=True " if cached else "prefix_cache=False"
        print(f"{name}: {calib.stats.token_evals / 1e6:9.2f} M token-evals  {seconds:8.2f} s  "
              f"{calib.stats.plans:6d} candidates scored ({calib.stats.abandoned} abandoned early)"
              + (f"; kept candidate states peaked at {calib.stats.restart_peak / 2 ** 20:.0f} MiB" if cached else ""))
    counted = straightforward_tokens(calib, runs[True]["plans"])
    if args.oracle_bound:
        oracle_bound(calib, args, runs[True])
    if args.work_only:
        print(f"straightforward search (closed form, not run): {counted / 1e6:9.2f} M token-evals; "
              f"{counted / max(runs[True]['tokens'], 1):.1f}x fewer encoder token-evaluations (hardware-independent)")
        return 0
    # The closed form is what --work-only reports: check it against the count of the search that ran.
    _require(counted == runs[False]["tokens"], f"closed-form count {counted} != measured {runs[False]['tokens']}")
    for s in args.sparsity:
        a, b = runs[True]["plans"][s], runs[False]["plans"][s]
        _require(a == b, f"plans differ at {s}: {a.summary()} vs {b.summary()}")
        sa, sb = a.meta["search"], b.meta["search"]
        _require(_close_beams(sa["beams"], sb["beams"]), f"beams or their scores differ at {s}")
        if "reuse" in a.meta:
            _require(math.isclose(a.meta["reuse"]["d_after"], b.meta["reuse"]["d_after"], rel_tol=1e-5),
                     f"re-use D differs at {s}")
        gap = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(sa["round_best"], sb["round_best"]))
        same = "identical" if gap == 0 else f"equal to {gap:.1e} relative (float rounding)"
        print(f"target {s}: identical plans -> {a.summary()}; best D of each of {sa['rounds']} rounds: {same}")
    naive, fast = runs[False], runs[True]
    print(f"speed-up: {naive['tokens'] / max(fast['tokens'], 1):.1f}x fewer encoder token-evaluations "
          f"(hardware-independent); {naive['seconds'] / fast['seconds']:.1f}x wall clock "
          f"({naive['seconds']:.1f} s vs {fast['seconds']:.1f} s)")
    print_scoring_peak(calib, args)
    return 0


def oracle_bound(calib: CalibrationSet, args: argparse.Namespace, run: dict[str, Any]) -> None:
    """The Skip phase again, each round told its bound in advance: the k-th lowest D of that round's candidates
    (from ``run``'s recorded beams), so early abandon drops a candidate as soon as its partial error passes the
    final bound; asserts the same beams. Its work against the Skip phase as it is shows how much a better bound
    could still save (not a strict floor: the candidate states kept for the next round depend on when candidates
    are dropped)."""
    beams = next(iter(run["plans"].values())).meta["search"]["beams"]
    rounds = iter([b[-1]["score"] for b in beams])
    search = calib.discrepancies
    work: dict[str, int] = {}
    for told in (False, True):
        def discrepancies(plans: Any, bound: float = math.inf, **kw: Any) -> list[float | None]:
            if told and kw.get("keep"):  # a Skip round: its bound from the start (never below the k-th D)
                bound = min(bound, math.nextafter(next(rounds), math.inf))
            return search(plans, bound, **kw)

        calib.discrepancies = discrepancies  # this instance only
        calib.stats, calib._prompt_error = ScoreStats(), [None] * len(calib.prompts)
        try:
            result = skip_phase(calib, args.beam_width, prefix_cache=True, progress=args.progress,
                                max_tokens=args.max_tokens, state_cache_gib=args.state_cache_gib)
        finally:
            del calib.discrepancies
        _require([[b["order"] for b in r] for r in beams] == [[list(b.order) for b in r] for r in result.rounds],
                 "the search with its bounds known in advance kept other beams")
        work["told" if told else "found"] = calib.stats.token_evals
    print(f"Skip phase with each round's bound known from the start: {work['told'] / 1e6:9.2f} M token-evals vs "
          f"{work['found'] / 1e6:.2f} M as it is (same beams): finding the bound costs "
          f"{100 * (work['found'] / max(work['told'], 1) - 1):+.1f} % work")


def straightforward_tokens(calib: CalibrationSet, plans: dict[float, Any]) -> int:
    """Token-evaluations of the straightforward search (one full forward per candidate, over every prompt and
    ∅) that returns ``plans``: each candidate runs its kept units; Skip rounds from the recorded beams, then
    the Re-use phase of each target from its recorded steps."""
    tokens = sum(b.input_ids.numel() for b in calib.batches)
    tokens += calib.null_batch.input_ids.numel() if calib.null_prompt else 0
    n = calib.identity.num_positions
    meta = next(iter(plans.values())).meta
    total, beams = 0, [Beam((), 0.0)]
    for round_beams in meta["search"]["beams"]:
        total += sum(n - len(o) for o in expand(beams, n, meta["settings"]["merge_same_set"]))
        beams = [Beam(tuple(b["order"]), b["score"]) for b in round_beams]
    for plan in plans.values():
        if "reuse" not in plan.meta:
            continue
        skipped = plan.meta["prefix"]
        total += n - skipped  # D of the skip plan
        for step in plan.meta["reuse"]["steps"]:
            options = (step["left"] is not None) + (step["right"] is not None)
            total += options * (n - skipped + 1)  # a variant runs one more unit
            skipped -= step["choice"] != "skip"
    return total * tokens


def print_scoring_peak(calib: CalibrationSet, args: argparse.Namespace) -> None:
    """One line: the memory of scoring one module call's worth of stacked candidate-prompts, now vs before."""
    rows = max(1, args.max_tokens // args.max_length)
    old, new = scoring_peak(calib, rows)
    print(f"scoring peak, {rows} stacked candidate-prompts ({args.max_tokens} tokens, one module call): "
          f"{_mib(new)} row_errors vs {_mib(old)} with whole-tensor float32/float64 copies")


def scoring_peak(calib: CalibrationSet, rows: int) -> tuple[int | None, int | None]:
    """Peak memory (bytes above the inputs) of the per-prompt error sums of ``rows`` stacked candidate-prompts
    [rows, L, features] against the dense features: the whole-tensor formula, then ``calib.row_errors``.
    CUDA: the allocator's peak; CPU: the process's resident high-water mark (Linux), None elsewhere."""
    ref = calib.dense[0][:1]
    dense = ref.expand(rows, *ref.shape[1:]).contiguous()
    pruned = dense + 0.01 * torch.randn_like(dense)
    mask = calib.batches[0].attention_mask[:1].expand(rows, -1)

    def whole() -> torch.Tensor:
        d, p = dense.float(), pruned.float()
        err = (d - p).pow(2)
        if calib.token_mask:
            err = err * mask.unsqueeze(-1).to(err.dtype)
        return err.double().sum(dim=(-2, -1))

    peaks = [_peak(whole, dense.device), _peak(lambda: calib.row_errors(dense, pruned, mask)[0], dense.device)]
    return peaks[0], peaks[1]


def _peak(fn: Any, device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
            f.write("5")
        base = _status("VmRSS")
        fn()
        return _status("VmHWM") - base
    except OSError:
        return None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.0f} MiB"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"bench_search: {message}")


def _close_beams(a: list, b: list) -> bool:
    """Same beams in every round, scores equal up to float rounding."""
    return len(a) == len(b) and all(
        len(ra) == len(rb) and all(x["order"] == y["order"] and
                                   math.isclose(x["score"], y["score"], rel_tol=1e-5, abs_tol=1e-12)
                                   for x, y in zip(ra, rb)) for ra, rb in zip(a, b))


# ----------------------------------------------------------------------------------------------- paper scale
@dataclass
class RandomTokenizer:
    """Stands in for the T5 tokenizer offline: 150-250 random ids per prompt (CC12M-like), eos 1, pad 0."""

    vocab_size: int = 32128

    def __call__(self, texts: list[str], padding: str, max_length: int, truncation: bool,
                 add_special_tokens: bool, return_tensors: str) -> Any:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            n = 0 if not text else int(torch.randint(150, 251, (1,), generator=g))
            n = min(n, max_length - 1)
            ids[row, :n] = torch.randint(3, self.vocab_size, (n,), generator=g)
            ids[row, n] = 1  # </s>
            mask[row, :n + 1] = 1
        return argparse.Namespace(input_ids=ids, attention_mask=mask)


def paper_scale(args: argparse.Namespace, arch: dict[str, Any] | None = None, device: str = "cuda") -> int:
    """Time Skip rounds on T5-v1.1-XXL shapes (bf16, random weights) and extrapolate to 1k prompts, k=3."""
    from diffusers.models.embeddings import PixArtAlphaTextProjection
    from transformers import T5Config, T5EncoderModel

    from skrr.architectures import T5_V1_1_XXL

    cfg = T5Config(**{**T5_V1_1_XXL, **(arch or {})}, is_encoder_decoder=False, use_cache=False,
                   tie_word_embeddings=False, dropout_rate=0.0)
    cfg._name_or_path = "random/t5-v1_1-xxl-shapes"
    torch.manual_seed(args.seed)
    with torch.device(device):
        encoder = T5EncoderModel(cfg).to(torch.bfloat16).eval()
        projection = PixArtAlphaTextProjection(in_features=cfg.d_model, hidden_size=1152).to(torch.bfloat16)
    prompts = [f"calibration prompt {i}" for i in range(args.prompts)]
    start = time.perf_counter()
    calib = CalibrationSet(encoder, RandomTokenizer(cfg.vocab_size), prompts, projection, max_length=args.max_length,
                           metric=args.metric, token_mask=args.token_mask, batch_size=16, device=device)
    _sync(device)
    dense_s = time.perf_counter() - start
    n_units, k = 2 * cfg.num_layers, args.beam_width
    rounds = default_rounds(n_units)  # the paper ran 24 rounds (half the units)
    scale = 1000 / args.prompts
    print(f"T5-v1.1-XXL shapes (d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_heads} heads, {cfg.num_layers} "
          f"blocks), bf16, {device}; {args.prompts} prompts x {args.max_length} tokens + null; "
          f"dense features in {dense_s:.1f} s")
    # Straightforward: one full forward over every prompt and ∅ per candidate.
    plan = calib.identity.with_slots({n_units - 2: None})
    calib.discrepancy(plan)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.naive_evals):
        calib.discrepancy(plan)
    _sync(device)
    naive_eval = (time.perf_counter() - start) / max(args.naive_evals, 1)
    naive_count = n_units + k * sum(n_units - s for s in range(1, rounds))  # SPEC §2: 2,532 for T5-XXL, k=3
    print(f"straightforward: {naive_eval:.2f} s per candidate ({args.prompts} prompts); 1k prompts, k={k}, "
          f"{rounds} rounds = {naive_count} candidates: {naive_eval * scale * naive_count / 3600:.2f} h")
    # Prefix-cached: time the first rounds (each round finishes its 2k best on ∅ first and abandons the rest
    # once they are proven worse than k of them).
    # Beam states kept across rounds: old and new beams, (units + 1) states each. The estimate is for 1k
    # prompts, so time them only if they would fit at 1k prompts too.
    per_beam = calib.state_bytes() * (n_units + 1) / 2 ** 30
    need_1k = 2 * k * per_beam * 1000 / args.prompts
    gib = args.state_cache_gib if need_1k <= args.state_cache_gib else 0.0
    print(f"beam hidden states: {per_beam:.2f} GiB per beam here, {2 * k} beams at 1k prompts need {need_1k:.0f} "
          f"GiB: {'kept across rounds' if gib else 'not kept (over --state-cache-gib)'}")
    calib.stats = ScoreStats()
    result = skip_phase(calib, k, max_rounds=args.rounds, prefix_cache=True, progress=args.progress,
                        max_tokens=args.max_tokens, state_cache_gib=gib)
    for r, (sec, cands) in enumerate(zip(result.round_seconds, result.candidates), start=1):
        print(f"round {r}: {sec:.1f} s for {cands} candidates x {args.prompts} prompts "
              f"({sec / cands:.3f} s per candidate; straightforward {naive_eval:.3f} s)"
              + (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device != "cpu" else ""))
    # Work of the timed rounds against the straightforward search's: each of its candidates in round r runs
    # the units - r kept units over every prompt and ∅.
    tokens = sum(b.input_ids.numel() for b in calib.batches) + calib.null_batch.input_ids.numel()
    naive_tokens = sum(c * (n_units - r) * tokens for r, c in enumerate(result.candidates, start=1))
    print(f"rounds 1-{len(result.candidates)}: {naive_tokens / max(calib.stats.token_evals, 1):.1f}x fewer encoder "
          f"token-evaluations than the straightforward search ({calib.stats.token_evals / 1e9:.2f} G vs "
          f"{naive_tokens / 1e9:.2f} G)")
    print_scoring_peak(calib, args)
    # Extrapolate: a round costs ~ candidates x mean suffix ~ (units left)^2; the last timed round sets the
    # rate (with its share of abandoned candidates), prompts scale linearly.
    last = len(result.round_seconds)
    rate = result.round_seconds[-1] / ((n_units - last + 1) * (n_units - last))
    est = sum(result.round_seconds) + sum(rate * (n_units - r + 1) * (n_units - r) for r in range(last + 1, rounds + 1))
    print(f"prefix-cached: estimated 1k prompts, k={k}, {rounds} rounds: {est * scale / 3600:.2f} h "
          f"(timed rounds + later rounds at the rate of round {last}, scaled by (units left)^2); "
          f"estimated speed-up {naive_eval * naive_count / est:.1f}x")
    return 0


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.paper_scale:
        if not torch.cuda.is_available():
            print("bench_search: --paper-scale needs a CUDA GPU (T5-v1.1-XXL, ~10 GB of bf16 weights); none found",
                  file=sys.stderr)
            return 2
        args.prompts, args.max_length = args.prompts or 64, args.max_length or 300
        return paper_scale(args)
    args.prompts, args.max_length = args.prompts or 8, args.max_length or 32
    args.d_ff = args.d_ff or 2 * args.d_model
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
