"""The one signature every pruning method shares, the registry that maps a method's name to its class, and
the rule that turns a removal order into a plan."""
from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from skrr.plan import PruningPlan, part_of
from skrr.surgery import count_params, removed_fraction, signature, units

if TYPE_CHECKING:
    from skrr.calib import CalibrationSet

log = logging.getLogger(__name__)

# The paper reports sparsity to 0.1 %: a prefix that falls short of the target by less than half of that
# counts as reaching it (24.31 % for 6 T5-XXL blocks reaches 0.243).
SPARSITY_TOLERANCE = 5e-4


class SparsityError(ValueError):
    """A target sparsity that cannot be (or cannot be any more) reached."""


def check_sparsity(sparsity: float) -> float:
    """Refuse a sparsity outside [0, 1) with a one-line message."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as err:
        raise SparsityError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from err
    if not 0.0 <= s < 1.0:
        raise SparsityError(f"sparsity must be a fraction in [0, 1) (e.g. 0.419 for 41.9 %), got {s}")
    return s


def prefix_length(encoder: Any, order: Sequence[int], sparsity: float, granularity: str) -> int:
    """Length of the shortest prefix of ``order`` whose removal reaches ``sparsity`` (SPEC §1)."""
    sparsity = check_sparsity(sparsity)
    sizes = units(encoder, granularity)
    total = count_params(encoder)
    removed = 0
    if sparsity <= SPARSITY_TOLERANCE:
        return 0
    for k, unit in enumerate(order, start=1):
        removed += sizes[unit].params
        if removed / total >= sparsity - SPARSITY_TOLERANCE:
            return k
    raise SparsityError(f"removing all {len(order)} {granularity}s of this order reaches only "
                        f"{100 * removed / total:.2f} % < {100 * sparsity:.2f} %; lower the sparsity or "
                        f"search a longer order")


def prefix_plan(encoder: Any, order: Sequence[int], sparsity: float, granularity: str, method: str,
                meta: dict[str, Any] | None = None) -> PruningPlan:
    """The plan that skips the shortest prefix of a removal order reaching ``sparsity``.

    The whole order is kept in ``meta['order']`` so one search serves every sparsity of a sweep.
    """
    k = prefix_length(encoder, order, sparsity, granularity)
    plan = PruningPlan.from_skips(signature(encoder), order[:k], granularity, method,
                                  {**(meta or {}), "order": list(map(int, order)), "prefix": k,
                                   "target_sparsity": float(sparsity)})
    return plan.with_meta(realized_sparsity=removed_fraction(encoder, plan))


def describe_order(order: Iterable[int], granularity: str) -> str:
    """'46(ffn), 5(ffn), 6(attn)' — an order with unit kinds, for logs."""
    return ", ".join(f"{i}({part_of(i, granularity)})" for i in order)


class PruningMethod(ABC):
    """Every method: ``search(calib, sparsity) -> PruningPlan`` on a CalibrationSet shared by all methods."""

    name: str = ""
    granularity: str = "unit"  # "unit" (attn/FFN sub-blocks) or "block"
    needs_calibration: bool = True  # False: search reads only the weights (magnitude pruning)

    @abstractmethod
    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        """The plan for one target sparsity."""

    def search_many(self, calib: "CalibrationSet", sparsities: Iterable[float]) -> dict[float, PruningPlan]:
        """Plans for several sparsities; ranking methods override this to search once."""
        return {float(s): self.search(calib, s) for s in sparsities}

    def settings(self) -> dict[str, Any]:
        """What changes the result (recorded in the plan and in the plan cache key)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ registry
# name -> class. A method registers itself where it is defined (@register_method); configs/method/<name>.yaml
# holds ``name: <name>`` and its settings. Adding a method touches its own file and its config, nothing else
# (the experiment layer imports every module of ``baselines`` to collect them: skrr.experiments.methods).
METHODS: dict[str, type[PruningMethod]] = {}


class MethodError(ValueError):
    """A method name or setting that no registered method accepts."""


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a PruningMethod buildable by its ``name``."""
    if not cls.name or cls.name != cls.name.lower():
        raise TypeError(f"{cls.__qualname__} needs a lowercase class attribute 'name' to be registered")
    if METHODS.get(cls.name, cls) is not cls:
        raise TypeError(f"method name {cls.name!r} is taken by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **settings: Any) -> PruningMethod:
    """The registered method ``name`` with ``settings``; a one-line MethodError names a bad name or key."""
    cls = METHODS.get(name)
    if cls is None:
        raise MethodError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))} "
                          f"(a new method is a PruningMethod with @register_method and configs/method/{name}.yaml)")
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise MethodError(f"method.{unknown[0]}: {name} has no setting {unknown[0]!r}; "
                          f"it takes {', '.join(accepted) or 'none'}")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:  # the class refuses a value: its own message, with the config node
        raise MethodError(f"method: {err}") from err


@register_method
class Dense(PruningMethod):
    """The unpruned encoder: the identity plan at sparsity 0."""

    name = "dense"

    def search(self, calib: "CalibrationSet", sparsity: float) -> PruningPlan:
        if check_sparsity(sparsity) > 0:
            raise SparsityError(f"method=dense prunes nothing; use sparsity=0 (got {sparsity})")
        return calib.identity.with_meta(target_sparsity=0.0, realized_sparsity=0.0)
