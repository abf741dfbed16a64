"""The results store: one folder per cell, a signature of the config that matters, resumable stages.

Layout (the on-disk contract between run.py, the tables and W&B):

    <results>/runs/<pipeline>/<method>[-<tag>][+<quantize>]/s<sparsity>/seed<seed>/
        cell.json              what this cell is + the signature of its config (written first)
        plan.json              the PruningPlan used (target and realized sparsity in its meta)
        plan_<encoder>.json    with encoders=: the plan of each other pruned text encoder (SD3's clip_l, clip_g)
        images/, manifest.jsonl  generated images (eval/generate.py layout)
        metrics/<metric>.json  one file per metric
        stages/<stage>.json    a stage's completion record; a stage whose record exists is skipped
        .images.lock           held while the cell's images are generated (one process generates them)
    <results>/plans/<encoder>/<key>.json   searched plans, shared across cells (key = encoder + calib + method)

Every file is written to a temporary name and renamed, so a killed run leaves whole files or none; files get
the umask's mode (skrr/io.py), so colleagues on a shared cluster can read results and share the plan cache.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from skrr.io import atomic_write_json
from skrr.plan import PlanError, PruningPlan


class StoreError(RuntimeError):
    """A cell folder that holds results of a different config, or an unreadable results file."""


def canonical(obj: Any) -> str:
    """Stable JSON text of a config (sorted keys) for hashing."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def short_hash(obj: Any, n: int = 10) -> str:
    """Short sha256 of an object's canonical JSON."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def slug(text: str) -> str:
    """A folder-safe name: 'PixArt-alpha/PixArt-Sigma' -> 'PixArt-alpha--PixArt-Sigma'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-") or "unnamed"


def sparsity_dir(sparsity: float) -> str:
    """'s0.419' — three decimals, as the paper reports one decimal of a percentage."""
    return f"s{float(sparsity):.3f}"


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: pipeline, method (+ variant tag, + text-encoder quantization), target sparsity, seed."""

    pipeline: str
    method: str
    sparsity: float
    seed: int = 0
    tag: str = ""
    quantize: str = "none"

    @property
    def method_dir(self) -> str:
        """'skrr', 'skrr-k1', 'skrr+int8': a quantized cell has its own folder, an unquantized one keeps its old one."""
        base = f"{self.method}-{self.tag}" if self.tag else self.method
        return f"{base}+{self.quantize}" if self.quantize not in ("", "none") else base

    def relpath(self) -> Path:
        return Path("runs") / self.pipeline / self.method_dir / sparsity_dir(self.sparsity) / f"seed{self.seed}"

    def label(self) -> str:
        return f"{self.pipeline}/{self.method_dir}/{sparsity_dir(self.sparsity)}/seed{self.seed}"


DROP_TAG = "drop_t5"  # the folder tag of an SD3 cell run without its T5 (drop_text_encoder=true)


def cell_tag(tag: str | None, drop_text_encoder: bool = False) -> str:
    """A cell's tag: the given one, else ``drop_t5`` for a cell without its T5 (its own folder ``dense-drop_t5``)."""
    return str(tag or (DROP_TAG if drop_text_encoder else ""))


def read_json(path: Path) -> Any:
    """Read a results JSON file; a corrupt one is a one-line StoreError naming the file and the fix."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is corrupt ({err.msg} at line {err.lineno}); delete it and re-run the "
                         f"cell to recompute it") from err


class CellStore:
    """The folder of one cell: refuses a changed config, records finished stages, paths for outputs."""

    def __init__(self, results: str | Path, cell: Cell, config: dict[str, Any], experiment: str = "adhoc"):
        self.results = Path(results)
        self.cell = cell
        self.config = config
        self.signature = short_hash(config)
        self.experiment = experiment
        self.dir = self.results / cell.relpath()

    # ------------------------------------------------------------------ paths
    @property
    def plan_path(self) -> Path:
        return self.dir / "plan.json"

    def plan_path_of(self, encoder: str | None = None) -> Path:
        """The plan of the main text encoder (plan.json) or of another one by name (plan_<name>.json: SD3's
        clip_l / clip_g with encoders=)."""
        return self.plan_path if encoder in (None, "t5") else self.dir / f"plan_{encoder}.json"

    @property
    def images_dir(self) -> Path:
        return self.dir / "images"

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    def metric_path(self, name: str) -> Path:
        return self.metrics_dir / f"{name}.json"

    def stage_path(self, stage: str) -> Path:
        return self.dir / "stages" / f"{stage}.json"

    def images_lock(self) -> FileLock:
        """The lock held while this cell's images are generated (by its own run or by a cell needing them)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / ".images.lock"))

    # ------------------------------------------------------------------ lifecycle
    def open(self, overwrite: bool = False) -> "CellStore":
        """Create the folder or check it belongs to this config; with overwrite, reset finished stages."""
        meta = self.dir / "cell.json"
        self.created = not meta.exists()
        if meta.exists():
            old = read_json(meta)
            # A folder with no finished stage holds nothing to protect (e.g. a run that failed to load weights).
            has_results = any((self.dir / "stages").glob("*.json"))
            if old.get("signature") != self.signature and has_results:
                changed = _diff_keys(old.get("config", {}), self.config)
                if not overwrite:
                    raise StoreError(
                        f"{self.dir} holds results of a different config (changed: {', '.join(changed) or '?'}); "
                        f"pass overwrite=true to replace them, or set tag=<name> for a new variant")
                for f in (self.dir / "stages").glob("*.json"):
                    f.unlink()
                for f in self.metrics_dir.glob("*.json"):
                    f.unlink()
                for f in self.dir.glob("plan*.json"):
                    f.unlink()
        atomic_write_json(meta, {"cell": asdict(self.cell), "signature": self.signature,
                                 "experiment": self.experiment, "config": self.config})
        return self

    def discard_unfinished(self) -> None:
        """After a failure before any stage finished: remove what this run made (its cell.json when it wrote the
        first one, lock files, empty folders up to the results root), so a bad input leaves nothing behind.
        Images already generated stay: a rerun resumes from them."""
        if not self.dir.is_dir() or any((self.dir / "stages").glob("*.json")):
            return
        if getattr(self, "created", False):
            (self.dir / "cell.json").unlink(missing_ok=True)
        if not any(p.is_file() for p in self.images_dir.rglob("*")):
            (self.dir / ".images.lock").unlink(missing_ok=True)
        for folder in sorted((p for p in self.dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir_if_empty(folder)
        remove_empty_parents(self.dir, self.results)

    def done(self, stage: str) -> bool:
        """Whether a stage finished for this config."""
        return self.stage_path(stage).exists()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record a finished stage (atomically, after its outputs are in place)."""
        atomic_write_json(self.stage_path(stage), {"stage": stage, "signature": self.signature, **(info or {})})

    def load_plan(self, encoder: str | None = None) -> PruningPlan | None:
        """The plan of this cell's main text encoder (or of ``encoder``), if the search stage wrote one."""
        path = self.plan_path_of(encoder)
        if not path.exists():
            return None
        try:
            return PruningPlan.from_json(path)
        except PlanError as err:
            raise StoreError(str(err)) from err


def _rmdir_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
        return True
    except OSError:  # not empty (or already gone)
        return not folder.exists()


def remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (and including) ``root``'s empty children;
    ``root`` itself stays."""
    folder, root = Path(folder), Path(root)
    while folder != root and root in folder.parents and _rmdir_if_empty(folder):
        folder = folder.parent


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix.rstrip(".")] if old != new else []
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
    return out


class PlanCache:
    """Searched plans keyed by encoder + calibration + method settings, shared by every cell that needs them."""

    def __init__(self, results: str | Path):
        self.root = Path(results) / "plans"

    def key(self, encoder_id: str, calib: dict[str, Any], method: dict[str, Any]) -> str:
        return short_hash({"encoder": encoder_id, "calib": calib, "method": method}, 12)

    def path(self, encoder_id: str, method_name: str, key: str) -> Path:
        return self.root / slug(encoder_id) / f"{method_name}-{key}.json"

    def get(self, path: Path) -> dict[str, Any] | None:
        """The cached search record (plans per target sparsity), or None."""
        return read_json(path) if path.exists() else None

    def put(self, path: Path, record: dict[str, Any]) -> None:
        atomic_write_json(path, record)
