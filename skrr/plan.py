"""PruningPlan: the one contract between every pruning method and everything downstream.

A plan lists the *positions* of the original stack (units, SPEC §1: ``2b`` = attention of block b,
``2b+1`` = FFN of block b; or whole blocks) and says what runs at each:

- ``Slot(source=i, part=...)`` with ``source == position``: the original unit, kept;
- ``None``: skipped, the residual branch is the identity (ShortGPT, FinerCut, Skrr Skip);
- ``Slot(source=j)`` with ``j != position``: re-use unit j's weights here (Skrr Re-use, Alg. 2);
- ``Slot(source=l, part="block", merged_from=(l, l+1, ...))``: LaCo's merged block (RDSC, SPEC §4).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PARTS = ("block", "attn", "ffn")
GRANULARITIES = ("unit", "block")


class PlanError(ValueError):
    """A plan that is malformed or does not belong to the encoder it is applied to."""


@dataclass(frozen=True)
class Slot:
    """What runs at one position of the pruned stack: whose weights (``source``) and which part."""

    source: int
    part: str
    merged_from: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise PlanError(f"slot part {self.part!r} is not one of {PARTS}")
        object.__setattr__(self, "merged_from", tuple(int(i) for i in self.merged_from))


@functools.lru_cache(maxsize=16)
def _own_slots(n: int, granularity: str) -> tuple[Slot, ...]:
    # Slots are immutable, so plans share them (a search builds thousands of plans).
    return tuple(Slot(i, part_of(i, granularity)) for i in range(n))


def part_of(position: int, granularity: str) -> str:
    """The part at a position: 'block' for block plans, else attn (even) / ffn (odd), SPEC §1."""
    if granularity == "block":
        return "block"
    return "attn" if position % 2 == 0 else "ffn"


@dataclass(frozen=True)
class EncoderSignature:
    """What identifies the encoder a plan was made for: hub id/path, revision, architecture, sizes."""

    model_id: str
    revision: str | None
    family: str
    arch: str  # short hash of the architecture hyperparameters, so tiny configs are told apart too
    num_blocks: int

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.model_id or '<unnamed>'}{rev} ({self.family}, {self.num_blocks} blocks, arch {self.arch})"


@dataclass(frozen=True)
class PruningPlan:
    """Which unit (or block) runs at each position of a pruned text encoder; JSON round-trips."""

    encoder: EncoderSignature
    granularity: str
    slots: tuple[Slot | None, ...]
    method: str = "dense"
    # Free-form record of how the plan was made: removal order, per-round scores, target/realized sparsity,
    # calibration hash. Not part of equality: two plans that prune the same way are the same plan.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        object.__setattr__(self, "slots", tuple(self.slots))
        self._check_structure()

    # ----------------------------------------------------------------- construction
    @classmethod
    def identity(cls, encoder: EncoderSignature, granularity: str = "unit", method: str = "dense") -> "PruningPlan":
        """The dense reference: every position runs its own unit."""
        return cls(encoder, granularity, _own_slots(num_positions(encoder, granularity), granularity), method)

    @classmethod
    def from_skips(cls, encoder: EncoderSignature, skipped: Iterable[int], granularity: str = "unit",
                   method: str = "dense", meta: dict[str, Any] | None = None) -> "PruningPlan":
        """A plan that skips the given positions and keeps the rest."""
        skipped = set(int(i) for i in skipped)
        n = num_positions(encoder, granularity)
        bad = sorted(i for i in skipped if not 0 <= i < n)
        if bad:
            raise PlanError(f"positions {bad} are out of range for {n} {granularity}s of {encoder.describe()}")
        slots = tuple(None if i in skipped else slot for i, slot in enumerate(_own_slots(n, granularity)))
        return cls(encoder, granularity, slots, method, dict(meta or {}))

    def with_slots(self, changes: dict[int, Slot | None], **meta: Any) -> "PruningPlan":
        """A copy with some positions replaced (and meta entries added)."""
        slots = list(self.slots)
        for pos, slot in changes.items():
            slots[pos] = slot
        return PruningPlan(self.encoder, self.granularity, tuple(slots), self.method, {**self.meta, **meta})

    def with_meta(self, **meta: Any) -> "PruningPlan":
        """A copy with meta entries added or replaced."""
        return dataclasses.replace(self, meta={**self.meta, **meta})

    # ----------------------------------------------------------------- views
    @property
    def num_positions(self) -> int:
        return len(self.slots)

    @property
    def skipped(self) -> tuple[int, ...]:
        """Positions whose own unit no longer runs there (skipped, re-used or merged away)."""
        return tuple(i for i, s in enumerate(self.slots) if s is None or s.source != i)

    @property
    def reused(self) -> dict[int, int]:
        """Position -> unit whose weights run there instead (Skrr Re-use)."""
        return {i: s.source for i, s in enumerate(self.slots) if s is not None and s.source != i}

    @property
    def merged(self) -> dict[int, tuple[int, ...]]:
        """Position -> blocks merged into it (LaCo)."""
        return {i: s.merged_from for i, s in enumerate(self.slots) if s is not None and s.merged_from}

    @property
    def dropped(self) -> tuple[int, ...]:
        """Original units (or blocks) whose weights the pruned encoder no longer holds."""
        used = {s.source for s in self.slots if s is not None}
        return tuple(i for i in range(self.num_positions) if i not in used)

    @property
    def is_identity(self) -> bool:
        return not self.skipped and not self.merged

    def summary(self) -> str:
        """One line, e.g. '48 units; skip 5,6,46; reuse 6->4; sparsity 41.92%'."""
        noun = "units" if self.granularity == "unit" else "blocks"
        merged_away = {j for m in self.merged.values() for j in m[1:]}
        skip = [i for i in self.skipped if i not in merged_away]
        parts = [f"{self.num_positions} {noun}"]
        parts.append("skip " + (",".join(map(str, skip)) if skip else "none"))
        if self.reused:
            parts.append("reuse " + ",".join(f"{i}->{j}" for i, j in sorted(self.reused.items())))
        if self.merged:
            parts.append("merge " + ",".join("+".join(map(str, m)) for m in self.merged.values()))
        if "realized_sparsity" in self.meta:
            parts.append(f"sparsity {100 * self.meta['realized_sparsity']:.2f}%")
        return f"{self.method}: " + "; ".join(parts)

    def fingerprint(self) -> str:
        """Short hash of what the plan does (not how it was found)."""
        body = json.dumps([self.granularity, _slots_to_json(self.slots), dataclasses.asdict(self.encoder)])
        return hashlib.sha256(body.encode()).hexdigest()[:10]

    # ----------------------------------------------------------------- validation
    def _check_structure(self) -> None:
        n = num_positions(self.encoder, self.granularity)
        if len(self.slots) != n:
            raise PlanError(f"plan has {len(self.slots)} positions but {self.encoder.describe()} has {n} "
                            f"{self.granularity}s; it was made for another encoder")
        for pos, slot in enumerate(self.slots):
            if slot is None:
                continue
            if not 0 <= slot.source < n:
                raise PlanError(f"position {pos} runs unit {slot.source}, which does not exist (0..{n - 1})")
            if slot.part != part_of(pos, self.granularity):
                raise PlanError(f"position {pos} is a {part_of(pos, self.granularity)} position but its slot "
                                f"runs a {slot.part}: re-use must stay within one type (SPEC §3)")
            if slot.source != pos:
                own = self.slots[slot.source]
                if own is None or own.source != slot.source:
                    raise PlanError(f"position {pos} re-uses unit {slot.source}, which is not kept at its own "
                                    f"position; re-use draws only on kept units (Alg. 2)")
            if slot.merged_from:
                if self.granularity != "block" or slot.merged_from[0] != pos or slot.source != pos:
                    raise PlanError(f"merged slot at {pos} must be a block slot merging into itself first, "
                                    f"got {slot.merged_from}")
                for j in slot.merged_from[1:]:
                    if not pos < j < n or self.slots[j] is not None:
                        raise PlanError(f"block {j} is merged into {pos} but is not a later, empty position")

    def validate(self, actual: EncoderSignature) -> "PruningPlan":
        """Refuse with a clear message when this plan was made for a different encoder; returns self.

        Takes the encoder's signature (``skrr.surgery.signature(encoder)``), so that a plan stays plain data
        that imports nothing of the surgery built on it.
        """
        if not isinstance(actual, EncoderSignature):
            raise TypeError(f"validate takes an EncoderSignature, got {type(actual).__name__}: "
                            f"use plan.validate(skrr.signature(encoder))")
        mine = self.encoder
        if mine.family != actual.family or mine.arch != actual.arch or mine.num_blocks != actual.num_blocks:
            raise PlanError(f"plan was made for {mine.describe()} but the encoder is {actual.describe()}; "
                            f"search a new plan for this encoder (or load the matching one)")
        if mine.model_id and actual.model_id and mine.model_id != actual.model_id:
            raise PlanError(f"plan was made for {mine.model_id!r} but the encoder is {actual.model_id!r}; "
                            f"search a new plan for this encoder")
        if mine.revision and actual.revision and mine.revision != actual.revision:
            raise PlanError(f"plan was made for revision {mine.revision!r} of {mine.model_id!r} but the encoder "
                            f"is revision {actual.revision!r}; search again or load the matching revision")
        return self

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "skrr-plan/1",
            "encoder": dataclasses.asdict(self.encoder),
            "granularity": self.granularity,
            "method": self.method,
            "summary": self.summary(),
            "slots": _slots_to_json(self.slots),
            "meta": self.meta,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize; when a path is given also write it atomically."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        if path is not None:
            from skrr.io import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningPlan":
        if d.get("format") != "skrr-plan/1":
            raise PlanError(f"not a skrr plan (format {d.get('format')!r}); expected 'skrr-plan/1'")
        slots = tuple(None if s is None else Slot(int(s["source"]), s["part"], tuple(s.get("merged_from", ())))
                      for s in d["slots"])
        return cls(EncoderSignature(**d["encoder"]), d["granularity"], slots, d.get("method", "dense"),
                   dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PruningPlan":
        """Parse a plan from JSON text or a file path; a corrupt file gives a one-line PlanError."""
        text = str(text_or_path)
        source = "text"
        if not text.lstrip().startswith("{"):
            source = str(text_or_path)
            try:
                text = Path(text_or_path).read_text()
            except OSError as err:
                raise PlanError(f"cannot read plan file {source}: {err.strerror}") from err
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PlanError(f"plan {source} is corrupt ({type(err).__name__}: {err}); delete it and search "
                            f"again") from err


def num_positions(encoder: EncoderSignature, granularity: str) -> int:
    """Positions a plan of this granularity has: 2 per block for units, 1 per block for blocks."""
    return encoder.num_blocks * (2 if granularity == "unit" else 1)


def _slots_to_json(slots: tuple[Slot | None, ...]) -> list[Any]:
    out: list[Any] = []
    for s in slots:
        if s is None:
            out.append(None)
        else:
            d: dict[str, Any] = {"source": s.source, "part": s.part}
            if s.merged_from:
                d["merged_from"] = list(s.merged_from)
            out.append(d)
    return out


def block_plan_to_units(plan: PruningPlan) -> PruningPlan:
    """Express a whole-block plan (no merges) on sub-block units: block b -> units 2b, 2b+1."""
    if plan.granularity == "unit":
        return plan
    if plan.merged:
        raise PlanError("a plan with merged blocks (LaCo) has no unit-level form; apply it as a block plan")
    slots: list[Slot | None] = []
    for s in plan.slots:
        slots += [None, None] if s is None else [Slot(2 * s.source, "attn"), Slot(2 * s.source + 1, "ffn")]
    return PruningPlan(plan.encoder, "unit", tuple(slots), plan.method, dict(plan.meta))
