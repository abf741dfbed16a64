"""Skrr (ICML 2025): the Skip phase (beam search, Alg. 1) and the Re-use phase (Alg. 2), SPEC §2-§3.

Skip: a state is an ordered list S of skipped units; each round expands every beam by every unit not in
S, scores all candidates with the discrepancy D (paper Eq. 3-4), keeps the ``beam_width`` lowest across all
expansions (candidates that are the same *set* are one candidate: same plan, same D) and repeats until the
best beam removes enough parameters. The best path is the lowest-D beam of the last round; every target
sparsity takes the shortest prefix of it that reaches the target (SPEC §1). Ties: lower D, then the
lexicographically smaller ordered list, so the search is deterministic.

Re-use: for each skipped unit i, try running the nearest kept unit of the same type below (l) or above (r)
at i; keep a change only if it strictly lowers D. No parameters are added.

``prefix_cache=True`` scores candidates with ``CalibrationSet.discrepancies`` (shared prefixes, batched
candidates, early abandon of candidates that provably cannot enter the beam); ``False`` calls
``discrepancy`` once per candidate. Both give the same plans and scores (tests/test_skrr.py,
scripts/bench_search.py).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from skrr.calib import MAX_TOKENS
from skrr.interface import (SPARSITY_TOLERANCE, PruningMethod, SparsityError, check_sparsity, describe_order,
                            prefix_plan)
from skrr.plan import PlanError, PruningPlan, Slot, block_plan_to_units, part_of
from skrr.surgery import count_params, units

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

REUSE_ORDERS = ("ascending", "skip")


@dataclass(frozen=True)
class Beam:
    """One state of the Skip phase: the ordered list of skipped units and its discrepancy."""

    order: tuple[int, ...]
    score: float


@dataclass
class SkipResult:
    """Outcome of the Skip phase: the best path and every round's beams."""

    rounds: list[list[Beam]] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # distinct candidate sets scored per round
    round_seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> Beam:
        return self.rounds[-1][0] if self.rounds else Beam((), 0.0)

    @property
    def order(self) -> list[int]:
        return list(self.best.order)

    def path_scores(self) -> list[float]:
        """D of each prefix of the best path (the prefix of length r is a beam of round r)."""
        out = []
        for r, beams in enumerate(self.rounds, start=1):
            prefix = self.best.order[:r]
            out.append(next(b.score for b in beams if b.order == prefix))
        return out

    def to_meta(self) -> dict[str, Any]:
        return {"round_best": [b[0].score for b in self.rounds], "path_scores": self.path_scores(),
                "beams": [[{"order": list(b.order), "score": b.score} for b in beams] for beams in self.rounds],
                "candidates": self.candidates, "rounds": len(self.rounds),
                "seconds": round(sum(self.round_seconds), 3)}


# ----------------------------------------------------------------------------------------------- scoring
def _scorer(calib: "CalibrationSet", prefix_cache: bool, max_tokens: int,
            bar: Any) -> Callable[[Sequence[PruningPlan], float], list[float | None]]:
    """``score(plans, bound)``: exact D per plan, or None where D > bound is proven (prefix cache only)."""
    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n)

    def score(plans: Sequence[PruningPlan], bound: float = math.inf) -> list[float | None]:
        if prefix_cache:
            return calib.discrepancies(plans, bound, max_tokens=max_tokens, progress=tick)
        out: list[float | None] = []
        for p in plans:
            out.append(calib.discrepancy(p))
            tick(1)
        return out

    return score


# ----------------------------------------------------------------------------------------------- Skip phase
def skip_phase(calib: "CalibrationSet", stop_sparsity: float, beam_width: int = 3, max_rounds: int | None = None,
               prefix_cache: bool = True, progress: bool = True, max_tokens: int = MAX_TOKENS) -> SkipResult:
    """Beam search over skipped units (Alg. 1) until the best beam reaches ``stop_sparsity``.

    With ``max_rounds`` the search runs exactly that many rounds instead (the paper ran 24), capped at the
    number of units. Candidates whose set was already expanded from another beam are merged (same plan).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    encoder, gran = calib.encoder, calib.granularity
    sizes = [u.params for u in units(encoder, gran)]
    total = count_params(encoder)
    n = len(sizes)
    if max_rounds is None and sum(sizes) / total < stop_sparsity - SPARSITY_TOLERANCE:
        raise SparsityError(f"removing all {n} {gran}s reaches only {100 * sum(sizes) / total:.2f} % < "
                            f"{100 * stop_sparsity:.2f} %; lower the sparsity")
    rounds_cap = n if max_rounds is None else min(int(max_rounds), n)
    sig = calib.runner.signature
    result = SkipResult()
    beams = [Beam((), 0.0)]  # D(dense) = 0
    # Last seen increase of D when unit u joins a beam: ranks candidates so that the likely best are scored
    # first and bound the rest (prefix cache only; it decides how much work is done, never the result).
    delta: dict[int, float] = {}
    outer = tqdm(total=rounds_cap, desc="skrr skip", unit="round", disable=not progress, leave=False)

    def reached(beam: Beam) -> bool:
        return sum(sizes[i] for i in beam.order) / total >= stop_sparsity - SPARSITY_TOLERANCE

    while len(result.rounds) < rounds_cap and (max_rounds is not None or not reached(beams[0])):
        start = time.perf_counter()
        # Expand every beam by every unit it does not skip; one candidate per set (Alg. 1, merged).
        cands: dict[frozenset[int], tuple[tuple[int, ...], float]] = {}
        for beam in beams:
            skipped = set(beam.order)
            for u in range(n):
                if u in skipped:
                    continue
                order = beam.order + (u,)
                guess = beam.score + delta.get(u, 0.0)
                key = frozenset(order)
                if key not in cands:
                    cands[key] = (order, guess)
                else:
                    old, old_guess = cands[key]
                    cands[key] = (min(old, order), min(old_guess, guess))
        orders = [o for o, _ in cands.values()]
        plans = [PruningPlan.from_skips(sig, o, gran, "skrr") for o in orders]
        bar = tqdm(total=len(plans), desc=f"round {len(result.rounds) + 1}", unit="cand",
                   disable=not progress, leave=False)
        scores, bound = _score_round(_scorer(calib, prefix_cache, max_tokens, bar), plans,
                                     [g for _, g in cands.values()], beam_width, use_bound=prefix_cache and bool(delta))
        bar.close()
        parent = {b.order: b.score for b in beams}
        seen: dict[int, float] = {}
        for o, d in zip(orders, scores):
            # An abandoned candidate is known only to lie above the bound.
            step = d - parent[o[:-1]] if d is not None else max(delta.get(o[-1], 0.0), bound - parent[o[:-1]])
            seen[o[-1]] = min(seen.get(o[-1], math.inf), step)
        delta.update(seen)
        ranked = sorted((Beam(o, d) for o, d in zip(orders, scores) if d is not None),
                        key=lambda b: (b.score, b.order))
        beams = ranked[:beam_width]
        result.rounds.append(beams)
        result.candidates.append(len(plans))
        result.round_seconds.append(time.perf_counter() - start)
        outer.update(1)
        outer.set_postfix(best=f"{beams[0].score:.4g}", sparsity=f"{sum(sizes[i] for i in beams[0].order) / total:.3f}")
        log.info("skrr round %d: %d candidates, best D %.6g, path %s", len(result.rounds), len(plans),
                 beams[0].score, describe_order(beams[0].order, gran))
    outer.close()
    return result


def _score_round(score: Callable[[Sequence[PruningPlan], float], list[float | None]], plans: list[PruningPlan],
                 guesses: list[float], k: int, use_bound: bool) -> tuple[list[float | None], float]:
    """Scores of one round's candidates (None only for candidates proven worse than k others), and the bound.

    With the bound: first score the 2k candidates ranked best by ``guesses``, take the k-th lowest of those
    as the bound, then score the rest, abandoning any whose partial error passes the bound (k candidates
    are then strictly below it, so it cannot be kept, Alg. 1).
    """
    if not use_bound or len(plans) <= 2 * k:
        return score(plans, math.inf), math.inf
    rank = sorted(range(len(plans)), key=lambda i: (guesses[i], i))
    seeds, rest = rank[:2 * k], rank[2 * k:]
    out: list[float | None] = [None] * len(plans)
    for i, d in zip(seeds, score([plans[i] for i in seeds], math.inf)):
        out[i] = d
    bound = sorted(out[i] for i in seeds)[k - 1]
    for i, d in zip(rest, score([plans[i] for i in rest], bound)):
        out[i] = d
    return out, bound


# ----------------------------------------------------------------------------------------------- Re-use phase
def reuse_phase(calib: "CalibrationSet", plan: PruningPlan, order: str = "ascending", *, prefix_cache: bool = True,
                progress: bool = False, max_tokens: int = MAX_TOKENS) -> PruningPlan:
    """Alg. 2: let each skipped position run its nearest kept unit of the same type when that strictly lowers D.

    Works on any method's skip plan (App. C.4): unit plans (same type = attn/ffn) and block plans (any kept
    block); a block plan is scored on a unit-granularity calibration set through its unit form. ``order`` is
    ``ascending`` (unit index) or ``skip`` (the order the units were removed, ``plan.meta['order']``).
    Returns the plan with the changes and ``meta['reuse']`` (D before/after and each decision).
    """
    if order not in REUSE_ORDERS:
        raise ValueError(f"reuse_order must be one of {REUSE_ORDERS}, got {order!r}")
    if plan.merged:
        raise PlanError("re-use applies to skip plans; this plan merges blocks (LaCo)")
    gran = plan.granularity
    to_calib = _converter(calib, plan)
    skipped = [i for i, s in enumerate(plan.slots) if s is None]
    if order == "ascending":
        sequence = sorted(skipped)
    else:
        removal = plan.meta.get("order")
        if removal is None:
            raise PlanError("reuse_order='skip' needs the plan's removal order in meta['order']; use 'ascending'")
        seen: list[int] = []
        for i in removal:
            if i in skipped and i not in seen:
                seen.append(i)
        sequence = seen + [i for i in sorted(skipped) if i not in seen]
    kept = [j for j, s in enumerate(plan.slots) if s is not None and s.source == j and not s.merged_from]
    bar = tqdm(total=1 + 2 * len(sequence), desc="skrr reuse", unit="cand", disable=not progress, leave=False)
    score = _scorer(calib, prefix_cache, max_tokens, bar)
    current = plan
    d_current = score([to_calib(current)], math.inf)[0]
    d_before = d_current
    steps = []
    for i in sequence:
        kind = part_of(i, gran)
        same = [j for j in kept if part_of(j, gran) == kind]  # block plans: every kept block
        left = max((j for j in same if j < i), default=None)
        right = min((j for j in same if j > i), default=None)
        options = {side: current.with_slots({i: Slot(j, kind)}) for side, j in (("left", left), ("right", right))
                   if j is not None}
        # A variant only matters if it beats the current D, so that is the bound (None = proven above it).
        found = dict(zip(options, score([to_calib(p) for p in options.values()], d_current))) if options else {}
        d_left = found.get("left")
        d_right = found.get("right")
        dl = math.inf if d_left is None else d_left
        dr = math.inf if d_right is None else d_right
        choice = "skip"
        if dl < d_current and dl < dr:
            choice = "left"
        elif dr < d_current and dr < dl:
            choice = "right"
        steps.append({"position": i, "left": left, "right": right, "d_current": d_current, "d_left": d_left,
                      "d_right": d_right, "choice": choice})
        if choice != "skip":
            current = options[choice]
            d_current = dl if choice == "left" else dr
            log.info("skrr reuse: %d -> %d (D %.6g)", i, left if choice == "left" else right, d_current)
        bar.update(2 - len(options))
    bar.close()
    return current.with_meta(reuse={"order": order, "d_before": d_before, "d_after": d_current, "steps": steps})


def _converter(calib: "CalibrationSet", plan: PruningPlan) -> Callable[[PruningPlan], PruningPlan]:
    """How to score a plan of this granularity on ``calib`` (a block plan through its unit form)."""
    if plan.granularity == calib.granularity:
        return lambda p: p
    if plan.granularity == "block" and calib.granularity == "unit":
        return block_plan_to_units
    raise PlanError(f"cannot score a {plan.granularity} plan on a calibration set of {calib.granularity}s")


# ----------------------------------------------------------------------------------------------- the method
class Skrr(PruningMethod):
    """Skip (beam search over sub-blocks, Alg. 1) then Re-use (Alg. 2); one search serves every sparsity."""

    name = "skrr"
    granularity = "unit"

    def __init__(self, beam_width: int = 3, reuse: bool = True, reuse_order: str = "ascending",
                 prefix_cache: bool = True, max_rounds: int | None = None, progress: bool = True,
                 max_tokens: int = MAX_TOKENS):
        if reuse_order not in REUSE_ORDERS:
            raise ValueError(f"reuse_order must be one of {REUSE_ORDERS}, got {reuse_order!r}")
        if int(beam_width) < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.beam_width = int(beam_width)
        self.reuse = bool(reuse)
        self.reuse_order = reuse_order
        self.max_rounds = None if max_rounds is None else int(max_rounds)
        # Speed knobs: they never change the plan, so they are not part of settings().
        self.prefix_cache = bool(prefix_cache)
        self.progress = bool(progress)
        self.max_tokens = int(max_tokens)

    def settings(self) -> dict[str, Any]:
        """What changes the plan (the plan cache key): not prefix_cache, progress or max_tokens."""
        return {"beam_width": self.beam_width, "reuse": self.reuse, "reuse_order": self.reuse_order,
                "max_rounds": self.max_rounds}

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The Skrr plan for one target sparsity."""
        return self.search_many(calib, [sparsity])[float(sparsity)]

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One beam search up to the largest target; each target is the shortest prefix of the best path."""
        targets = [check_sparsity(s) for s in sparsities]
        if not targets:
            return {}
        if calib.granularity != "unit":
            log.info("skrr: %s encoders have no exact sub-block removal; searching %ss", calib.runner.family.name,
                     calib.granularity)
        skip = skip_phase(calib, max(targets), self.beam_width, self.max_rounds, self.prefix_cache, self.progress,
                          self.max_tokens)
        meta = {"settings": self.settings(), "beam_width": self.beam_width, "calib": calib.settings(),
                "search": skip.to_meta()}
        plans: dict[float, PruningPlan] = {}
        for s in targets:
            plan = prefix_plan(calib.encoder, skip.order, s, calib.granularity, self.name, meta)
            if self.reuse:
                plan = reuse_phase(calib, plan, self.reuse_order, prefix_cache=self.prefix_cache,
                                   progress=self.progress, max_tokens=self.max_tokens)
            plans[float(s)] = plan
            log.info("skrr: target %.4f -> %s", s, plan.summary())
        return plans
