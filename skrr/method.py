"""Skrr (ICML 2025): the Skip phase (beam search, Alg. 1) and the Re-use phase (Alg. 2), SPEC §2-§3.

Skip: a state is an ordered list S of skipped units; each round expands every beam by every unit not in
S, scores all candidates with the discrepancy D (paper Eq. 3-4) and keeps the ``beam_width`` lowest across
all expansions. The search runs ``max_rounds`` rounds (default half the units: the paper's 24 of T5-XXL's
48) whatever the targets, so the best path S* (the lowest-D beam of the last round) depends only on the
calibration set and these settings; every target sparsity takes the shortest prefix of S* that reaches it
(SPEC §1), and a plan never depends on which other targets share a sweep.

Same-set candidates (``merge_same_set=True``, our choice): two expansions that reach the same *set* are one
candidate (same plan, same D); it keeps the order reached from the parent beam with the lower D (ties: the
parent's rank), i.e. the better history, so its prefixes are the better smaller plans. ``False`` is the
literal Alg. 1: duplicates stay in the ranking (stable sort by D, in expansion order). Ties between
different sets: lower D, then the lexicographically smaller ordered list, so the search is deterministic.

Re-use: for each skipped unit i, try running the nearest kept unit of the same type below (l) or above (r)
at i; keep a change only if it strictly lowers D. No parameters are added.

``prefix_cache=True`` scores candidates with ``CalibrationSet.discrepancies`` (shared prefixes, batched
candidates, early abandon of candidates that provably cannot enter the beam) and, within
``state_cache_gib``, keeps each beam's hidden states across rounds (``PrefixStates``) and the candidate
states that the next round's candidates restart from (``RestartStates``); ``False`` calls ``discrepancy``
once per candidate. Both give the same plans and scores (tests/test_skrr.py, scripts/bench_search.py).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from skrr.calib import MAX_TOKENS, PrefixStates, RestartStates, plan_keys
from skrr.interface import (SPARSITY_TOLERANCE, PruningMethod, SparsityError, check_sparsity, describe_order,
                            prefix_plan, register_method)
from skrr.plan import PlanError, PruningPlan, Slot, block_plan_to_units, part_of
from skrr.surgery import count_params, units

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

REUSE_ORDERS = ("ascending", "skip")
# Memory for hidden states kept across rounds (beam states, SPEC §2 "reuse the hidden state of the shared
# prefix"): ample for the tiny pipelines; T5-XXL needs ~120 GB per beam on 1k prompts, so there the budget
# is the user's call (method.state_cache_gib) and the search recomputes each beam's trunk otherwise.
STATE_CACHE_GIB = 4.0


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
Scorer = Callable[..., list[float | None]]


def _scorer(calib: "CalibrationSet", prefix_cache: bool, max_tokens: int, bar: Any) -> Scorer:
    """``score(plans, bound, bases, keep, restarts)``: exact D per plan, or None where D > bound, or D above
    ``keep`` other plans', is proven (prefix cache only); plans start from the stored states in ``bases`` they
    share a prefix with, or from the last round's in ``restarts``."""
    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n)

    def score(plans: Sequence[PruningPlan], bound: float = math.inf, bases: Sequence[PrefixStates] = (),
              keep: int | None = None, restarts: RestartStates | None = None) -> list[float | None]:
        if prefix_cache:
            return calib.discrepancies(plans, bound, keep=keep, bases=bases, max_tokens=max_tokens,
                                       progress=tick, restarts=restarts)
        out: list[float | None] = []
        for p in plans:
            out.append(calib.discrepancy(p))
            tick(1)
        return out

    return score


# ----------------------------------------------------------------------------------------------- Skip phase
def default_rounds(num_units: int) -> int:
    """The paper's number of Skip rounds: half the units (24 of T5-XXL's 48), at least one."""
    return max(1, num_units // 2)


def skip_phase(calib: "CalibrationSet", beam_width: int = 3, max_rounds: int | None = None,
               prefix_cache: bool = True, progress: bool = True, max_tokens: int = MAX_TOKENS,
               state_cache_gib: float = STATE_CACHE_GIB, merge_same_set: bool = True) -> SkipResult:
    """Beam search over skipped units (Alg. 1) for ``max_rounds`` rounds (None: half the units, the paper's
    24 of 48), capped at the number of units; the result does not depend on any target sparsity.

    ``merge_same_set``: candidates that are the same set are one, with the order reached from the lower-D
    parent beam (ties: the parent's rank); False keeps the duplicates (literal Alg. 1, stable sort by D).
    With the prefix cache, each beam's hidden states are kept while they fit in ``state_cache_gib``, and the
    rest of that budget keeps candidate states for the next round (``RestartStates``).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_rounds is not None and int(max_rounds) < 1:
        raise ValueError(f"max_rounds must be >= 1 (or None for half the units), got {max_rounds}")
    gran = calib.granularity
    n = calib.identity.num_positions
    rounds_cap = min(default_rounds(n) if max_rounds is None else int(max_rounds), n - len(calib.protected))
    sig = calib.runner.signature
    sizes = [u.params for u in units(calib.encoder, gran)]
    total = count_params(calib.encoder)
    result = SkipResult()
    beams = [Beam((), 0.0)]  # D(dense) = 0
    outer = tqdm(total=rounds_cap, desc="skrr skip", unit="round", disable=not progress, leave=False)
    kept = _StateBudget(calib, state_cache_gib if prefix_cache else 0.0, max_tokens)
    held: dict[tuple[int, ...], PrefixStates] = {}
    # Candidate states kept from one round for the next one's candidates (same budget, after the beam states).
    restarts = RestartStates(kept.limit) if kept.limit > 0 else None

    while len(result.rounds) < rounds_cap:
        start = time.perf_counter()
        orders = expand(beams, n, merge_same_set, calib.protected)
        plans = [PruningPlan.from_skips(sig, o, gran, "skrr") for o in orders]
        # Each beam's states, derived from its parent's (the beam of the last round it extends).
        held = kept.derive({b.order: PruningPlan.from_skips(sig, b.order, gran, "skrr") for b in beams},
                           held, parent_of=lambda order: order[:-1], restarts=restarts)
        bar = tqdm(total=len(plans), desc=f"round {len(result.rounds) + 1}", unit="cand",
                   disable=not progress, leave=False)
        # None: proven worse than beam_width other candidates, so it cannot be kept (prefix cache only).
        if restarts is not None:
            restarts.limit = kept.limit - kept.held_bytes(held)
        scores = _scorer(calib, prefix_cache, max_tokens, bar)(plans, math.inf, list(held.values()), beam_width,
                                                               restarts)
        bar.close()
        found = [Beam(o, d) for o, d in zip(orders, scores) if d is not None]
        # Merged: one candidate per set, so ties between sets go to the smaller ordered list. Literal Alg. 1:
        # a stable sort by D alone (duplicates of one set have the same D and stay in expansion order).
        beams = sorted(found, key=(lambda b: (b.score, b.order)) if merge_same_set else (lambda b: b.score))
        beams = beams[:beam_width]
        if restarts is not None:
            restarts.advance([plan_keys(PruningPlan.from_skips(sig, b.order, gran, "skrr")) for b in beams])
        result.rounds.append(beams)
        result.candidates.append(len(plans))
        result.round_seconds.append(time.perf_counter() - start)
        outer.update(1)
        outer.set_postfix(best=f"{beams[0].score:.4g}", sparsity=f"{sum(sizes[i] for i in beams[0].order) / total:.3f}")
        log.info("skrr round %d: %d candidates, best D %.6g, path %s", len(result.rounds), len(plans),
                 beams[0].score, describe_order(beams[0].order, gran))
    outer.close()
    return result


def expand(beams: Sequence[Beam], num_units: int, merge_same_set: bool = True,
           protected: Sequence[int] = ()) -> list[tuple[int, ...]]:
    """Every beam (best first) extended by every unit it does not skip (Alg. 1), in expansion order; units in
    ``protected`` are never candidates (SD3's CLIP with calib.clip_last_block=false, skrr/readout.py).

    Merged, a set reached from several beams keeps the order from the first of them in rank order, i.e. the
    parent with the lower D (ties: the parent's rank), not the lexicographically smaller order: on MiniLM the
    latter turned the path (3, 1, 4) into (1, 3, 4) and so the 1-block plan into a worse block.
    """
    cands: dict[frozenset[int] | tuple[int, ...], tuple[int, ...]] = {}
    for beam in beams:
        skipped = set(beam.order) | set(protected)
        for u in range(num_units):
            if u not in skipped:
                order = beam.order + (u,)
                cands.setdefault(frozenset(order) if merge_same_set else order, order)
    return list(cands.values())


class _StateBudget:
    """Keeps ``PrefixStates`` for the plans a phase builds on, while they fit in ``gib``."""

    def __init__(self, calib: "CalibrationSet", gib: float, max_tokens: int):
        self.calib = calib
        self.limit = int(gib * 2 ** 30)
        self.max_tokens = max_tokens
        self.per_state = calib.state_bytes()
        self.positions = calib.identity.num_positions
        self.over = False  # logged once

    def held_bytes(self, held: dict[Any, PrefixStates]) -> int:
        """Memory of the distinct state tensors of some bases."""
        return len({id(t) for s in held.values() for t in s.states}) * self.per_state

    def derive(self, plans: dict[Any, PruningPlan], held: dict[Any, PrefixStates],
               parent_of: Callable[[Any], Any], restarts: RestartStates | None = None) -> dict[Any, PrefixStates]:
        """States for ``plans`` (by key), each derived from ``held[parent_of(key)]`` where held; {} when the
        old and new states together would pass the budget (the scorer then recomputes prefixes)."""
        if self.limit <= 0:
            return {}
        old = len({id(t) for s in held.values() for t in s.states})
        new = 0
        for key, plan in plans.items():
            parent = held.get(parent_of(key))
            new += self.positions + 1 - (parent.start(plan_keys(plan)) if parent else 0)
        if (old + new) * self.per_state > self.limit:
            if not self.over:
                log.info("skrr: %.2f GiB of hidden states would pass state_cache_gib=%.2f; recomputing prefixes "
                         "instead (same plan, more work)", (old + new) * self.per_state / 2 ** 30,
                         self.limit / 2 ** 30)
            self.over = True
            return {}
        return {key: self.calib.prefix_states(plan, held.get(parent_of(key)), max_tokens=self.max_tokens,
                                              restarts=restarts)
                for key, plan in plans.items()}


# ----------------------------------------------------------------------------------------------- Re-use phase
def reuse_phase(calib: "CalibrationSet", plan: PruningPlan, order: str = "ascending", *, prefix_cache: bool = True,
                progress: bool = False, max_tokens: int = MAX_TOKENS,
                state_cache_gib: float = STATE_CACHE_GIB) -> PruningPlan:
    """Alg. 2: let each skipped position run its nearest kept unit of the same type when that strictly lowers D.

    Works on any method's skip plan (App. C.4): unit plans (same type = attn/ffn) and block plans (any kept
    block); a block plan is scored on a unit-granularity calibration set through its unit form. ``order`` is
    ``ascending`` (unit index) or ``skip`` (the order the units were removed, ``plan.meta['order']``).
    Returns the plan with the changes and ``meta['reuse']`` (D before/after and each decision). With the
    prefix cache, the current plan's hidden states are kept (within ``state_cache_gib``) so that a variant
    at position i runs only the positions from i on.
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
    budget = _StateBudget(calib, state_cache_gib if prefix_cache else 0.0, max_tokens)
    current = plan
    held = budget.derive({"current": to_calib(current)}, {}, parent_of=lambda key: key)
    d_current = score([to_calib(current)], math.inf, list(held.values()))[0]
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
        found = (dict(zip(options, score([to_calib(p) for p in options.values()], d_current, list(held.values()))))
                 if options else {})
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
            held = budget.derive({"current": to_calib(current)}, held, parent_of=lambda key: key)
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
@register_method
class Skrr(PruningMethod):
    """Skip (beam search over sub-blocks, Alg. 1) then Re-use (Alg. 2); one search path serves every sparsity."""

    name = "skrr"
    granularity = "unit"

    def __init__(self, beam_width: int = 3, reuse: bool = True, reuse_order: str = "ascending",
                 prefix_cache: bool = True, max_rounds: int | None = None, progress: bool = True,
                 max_tokens: int = MAX_TOKENS, state_cache_gib: float = STATE_CACHE_GIB,
                 merge_same_set: bool = True):
        if reuse_order not in REUSE_ORDERS:
            raise ValueError(f"reuse_order must be one of {REUSE_ORDERS}, got {reuse_order!r}")
        if int(beam_width) < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        if max_rounds is not None and int(max_rounds) < 1:
            raise ValueError(f"max_rounds must be >= 1 (or null for half the units), got {max_rounds}")
        self.beam_width = int(beam_width)
        self.reuse = bool(reuse)
        self.reuse_order = reuse_order
        self.max_rounds = None if max_rounds is None else int(max_rounds)
        self.merge_same_set = bool(merge_same_set)
        # Speed knobs: they never change the plan, so they are not part of settings().
        self.prefix_cache = bool(prefix_cache)
        self.progress = bool(progress)
        self.max_tokens = int(max_tokens)
        self.state_cache_gib = float(state_cache_gib)
        if self.state_cache_gib < 0:
            raise ValueError(f"state_cache_gib must be >= 0 (0 = keep no beam states), got {state_cache_gib}")

    def settings(self) -> dict[str, Any]:
        """What changes the plan (the plan cache key): not prefix_cache, progress, max_tokens or
        state_cache_gib."""
        return {"beam_width": self.beam_width, "reuse": self.reuse, "reuse_order": self.reuse_order,
                "max_rounds": self.max_rounds, "merge_same_set": self.merge_same_set}

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The Skrr plan for one target sparsity."""
        return self.search_many(calib, [sparsity])[float(sparsity)]

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """One beam search of ``max_rounds`` rounds, whatever the targets; each target is the shortest prefix
        of its best path S* (so the plan at s is the same in every sweep that asks for s)."""
        targets = [check_sparsity(s) for s in sparsities]
        if not targets:
            return {}
        if calib.granularity != "unit":
            log.info("skrr: %s encoders have no exact sub-block removal; searching %ss", calib.runner.family.name,
                     calib.granularity)
        if max(targets) <= SPARSITY_TOLERANCE:  # the dense plan: no path needed
            return {float(s): prefix_plan(calib.encoder, [], s, calib.granularity, self.name,
                                          {"settings": self.settings()}) for s in targets}
        n = calib.identity.num_positions
        rounds = default_rounds(n) if self.max_rounds is None else min(self.max_rounds, n)
        sizes = sorted((u.params for u in units(calib.encoder, calib.granularity)), reverse=True)
        total = count_params(calib.encoder)
        # Refuse before hours of search when no path of this length can reach a target.
        self._check_reach(max(targets), sum(sizes[:rounds]) / total, rounds, n, sum(sizes) / total,
                          "any path (the largest units)")
        skip = skip_phase(calib, self.beam_width, self.max_rounds, self.prefix_cache, self.progress,
                          self.max_tokens, self.state_cache_gib, self.merge_same_set)
        meta = {"settings": self.settings(), "beam_width": self.beam_width, "calib": calib.settings(),
                "search": skip.to_meta()}
        path_share = removed_share(calib, skip.order)
        plans: dict[float, PruningPlan] = {}
        for s in targets:
            self._check_reach(s, path_share, rounds, n, sum(sizes) / total, "the best path")
            plan = prefix_plan(calib.encoder, skip.order, s, calib.granularity, self.name, meta)
            if self.reuse:
                plan = reuse_phase(calib, plan, self.reuse_order, prefix_cache=self.prefix_cache,
                                   progress=self.progress, max_tokens=self.max_tokens,
                                   state_cache_gib=self.state_cache_gib)
            plans[float(s)] = plan
            log.info("skrr: target %.4f -> %s", s, plan.summary())
        return plans

    def _check_reach(self, target: float, share: float, rounds: int, n: int, everything: float, what: str) -> None:
        """One line naming method.max_rounds when ``share`` (of ``rounds`` units) falls short of ``target``."""
        if share >= target - SPARSITY_TOLERANCE:
            return
        if everything < target - SPARSITY_TOLERANCE:
            raise SparsityError(f"skrr: removing all {n} units reaches only {100 * everything:.2f} % < "
                                f"{100 * target:.2f} %; lower the sparsity")
        setting = "null = half the units" if self.max_rounds is None else str(self.max_rounds)
        raise SparsityError(f"skrr: {what} of {rounds} rounds removes {100 * share:.2f} % < "
                            f"{100 * target:.2f} %; raise method.max_rounds (now {setting}; at most {n}) or lower "
                            f"the sparsity")


def removed_share(calib: "CalibrationSet", order: Sequence[int]) -> float:
    """Fraction of the encoder's parameters held by the units of ``order`` (SPEC §1 sparsity)."""
    sizes = units(calib.encoder, calib.granularity)
    return sum(sizes[i].params for i in order) / count_params(calib.encoder)
