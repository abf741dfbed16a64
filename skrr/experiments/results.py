"""Reading results from disk: an experiment's cells (as run.py composes them), their metric files, status.

Reads only the store (skrr/experiments/store.py); never W&B. An experiment (``configs/experiment/<name>.yaml``)
lists its cells as Hydra overrides in ``sweep.cells``. The paper's numbers and the tables built from these
reads are in ``reference.py``; markdown / LaTeX / CSV / plots in ``render.py``.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skrr.experiments.store import Cell, CellStore, StoreError, cell_tag, read_json

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# A backbone name with one of these marks is a stand-in (eval/backbones.py labels them so): never comparable.
STAND_IN = re.compile(r"\bNOT\b|relative only|random|stand-in|offline", re.IGNORECASE)
SPARSITY_TOL = 5e-4  # targets are written with three decimals (store.sparsity_dir)
PROVENANCE_KEYS = ("mode", "memory_kind")  # string fields of a metric file worth a footnote


class TableError(RuntimeError):
    """A table or experiment config that cannot be used (unknown name, row outside its experiment)."""


# ---------------------------------------------------------------------------- experiments and their cells
@dataclass(frozen=True)
class ExperimentCell:
    """One entry of an experiment's ``sweep.cells``: its overrides, the store cell it fills, what it runs."""

    experiment: str
    index: int
    overrides: tuple[str, ...]
    cell: Cell
    stages: tuple[str, ...]
    metrics: tuple[str, ...]

    def command(self) -> str:
        """The short command that fills this cell."""
        return f"python run.py experiment={self.experiment} cell={self.index}"

    def explicit_command(self) -> str:
        """The same cell spelled out (experiment settings + the cell's own overrides)."""
        given = {o.split("=", 1)[0].lstrip("+~") for o in self.overrides}
        ident = [f"pipeline={self.cell.pipeline}" if "pipeline" not in given else None,
                 f"method={self.cell.method}" if "method" not in given else None]
        args = [f"experiment={self.experiment}", *filter(None, ident), *self.overrides]
        return "python run.py " + " ".join(shlex.quote(a) for a in args)


def compose_configs(config_dir: Path, *override_lists: Sequence[str]) -> list[DictConfig]:
    """The root config under each list of overrides (Hydra compose API), hydra node kept for group choices."""
    from hydra import compose, initialize_config_dir

    # paths.root defaults to ${hydra:runtime.cwd}, which only resolves inside a Hydra app.
    root = f"++paths.root='{Path.cwd()}'"
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve()), job_name="skrr"):
        return [compose("config", overrides=[*o, root], return_hydra_config=True) for o in override_lists]


def names(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Config names in a group folder, e.g. names('experiment')."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def check_name(group: str, name: str, config_dir: Path) -> None:
    """Refuse a config name that has no file in ``configs/<group>/``, listing the ones that do."""
    if not (Path(config_dir) / group / f"{name}.yaml").exists():
        raise TableError(f"unknown {group} {name!r}; choose one of: {', '.join(names(group, config_dir))} "
                         f"(configs/{group}/)")


def experiment_cells(experiment: str, config_dir: Path = CONFIG_DIR) -> list[ExperimentCell]:
    """Every cell of an experiment, each composed exactly as ``run.py experiment=<name> cell=<i>`` does."""
    check_name("experiment", experiment, config_dir)
    (base,) = compose_configs(config_dir, [f"experiment={experiment}"])
    raw = [tuple(str(o) for o in overrides) for overrides in (OmegaConf.select(base, "sweep.cells") or [])]
    out = []
    for i, (overrides, cfg) in enumerate(zip(raw, compose_configs(config_dir, *[[f"experiment={experiment}", *o]
                                                                          for o in raw]))):
        cell = Cell(str(cfg.pipeline.name), str(cfg.hydra.runtime.choices["method"]), float(cfg.sparsity),
                    int(cfg.seed), cell_tag(cfg.tag, bool(cfg.get("drop_text_encoder"))),
                    str(cfg.get("quantize") or "none"))
        metrics = tuple(str(m) for m in cfg.eval.keys()) if cfg.get("eval") else ()
        out.append(ExperimentCell(experiment, i, overrides, cell, tuple(cfg.stages), metrics))
    return out


def default_results(config_dir: Path = CONFIG_DIR) -> Path:
    """``paths.results`` of the root config (env SKRR_RESULTS and configs/local/ included)."""
    return Path(compose_configs(config_dir, [])[0].paths.results)


# ---------------------------------------------------------------------------- reading one cell
@dataclass(frozen=True)
class MetricRecord:
    """One metric file, normalised: field values, backbone, realized sparsity and image count."""

    values: dict[str, float]
    backbone: str | None
    realized_sparsity: float | None
    n_images: int | None
    comparable: bool | None = None  # explicit flag in the file, if the evaluator wrote one
    labels: tuple[str, ...] = ()    # how it was measured, e.g. 'mode=clean', 'memory_kind=bf16-bytes'


def read_metric(path: Path) -> MetricRecord:
    """Read ``metrics/<metric>.json`` into dotted field values ('value', 'tasks.counting', 'params_b', ...).

    The one place that knows the evaluator's schema (eval/score.py): ``value`` is the headline; GenEval's
    per-task scores (``per_task`` or ``tasks``) become ``tasks.<task>``; cost carries params (a count, or a
    dict with ``total``) or params_b, memory_gib or memory_gb, tflops.
    """
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise StoreError(f"{path} is not a metric record (expected a JSON object); delete it and re-run the cell")
    values: dict[str, float] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"{prefix}{k}"] = float(v)

    walk(doc, "")
    for k, v in list(values.items()):
        if k.startswith("per_task."):
            values.setdefault("tasks." + k[len("per_task."):], v)
    params = doc.get("params")
    if "params_b" not in values:
        total = params.get("total") if isinstance(params, Mapping) else params
        if isinstance(total, (int, float)):
            values["params_b"] = float(total) / 1e9
    if "memory_gb" not in values and "memory_gib" in values:
        values["memory_gb"] = values["memory_gib"]
    realized = doc.get("realized_sparsity")
    flag = doc.get("comparable")
    labels = tuple(f"{k}={doc[k]}" for k in PROVENANCE_KEYS if isinstance(doc.get(k), str))
    return MetricRecord(values, doc.get("backbone"), float(realized) if realized is not None else None,
                        doc.get("n_images"), bool(flag) if flag is not None else None, labels)


@dataclass
class CellResult:
    """What is on disk for one experiment cell."""

    spec: ExperimentCell
    dir: Path
    stages: dict[str, bool]
    metrics: dict[str, MetricRecord]
    realized_sparsity: float | None

    @property
    def missing_metrics(self) -> list[str]:
        return [m for m in self.spec.metrics if m not in self.metrics]

    @property
    def done(self) -> bool:
        """All stages recorded and every selected metric file present."""
        return all(self.stages.values()) and not self.missing_metrics


def read_cell(results: Path, spec: ExperimentCell) -> CellResult:
    """Stage records, metric files and realized sparsity of a cell (corrupt files raise StoreError)."""
    store = CellStore(results, spec.cell, {})  # the cell's on-disk layout (its config is not needed to read)
    stages = {s: store.done(s) for s in spec.stages}
    metrics = {p.stem: read_metric(p) for p in sorted(store.metrics_dir.glob("*.json"))}
    realized = None
    if store.plan_path.exists():
        plan = read_json(store.plan_path)
        realized = (plan.get("meta") or {}).get("realized_sparsity") if isinstance(plan, dict) else None
    if realized is None:
        realized = next((m.realized_sparsity for m in metrics.values() if m.realized_sparsity is not None), None)
    if realized is None and spec.cell.method == "dense" and store.plan_path.exists():
        realized = 0.0
    return CellResult(spec, store.dir, stages, metrics, float(realized) if realized is not None else None)


# ---------------------------------------------------------------------------- status
def status_lines(experiment: str, results: Path, config_dir: Path = CONFIG_DIR) -> tuple[list[str], int, int]:
    """A per-cell report of an experiment (stages, metrics, commands); returns (lines, done, total)."""
    cells = [read_cell(results, c) for c in experiment_cells(experiment, config_dir)]
    stages = list(dict.fromkeys(s for c in cells for s in c.spec.stages))
    width = max((len(c.spec.cell.label()) for c in cells), default=10)
    lines = [f"experiment {experiment}: {sum(c.done for c in cells)}/{len(cells)} cells done  ({results})",
             f"  {'#':>3}  {'cell':<{width}}  " + "  ".join(f"{s:<8}" for s in stages) + "  metrics"]
    for c in cells:
        marks = "  ".join(f"{('done' if c.stages.get(s) else '-') if s in c.stages else 'n/a':<8}" for s in stages)
        got = [m for m in c.spec.metrics if m in c.metrics]
        metrics = f"{len(got)}/{len(c.spec.metrics)}" + (f" (missing {','.join(c.missing_metrics)})"
                                                         if c.missing_metrics else "")
        lines.append(f"  {c.spec.index:>3}  {c.spec.cell.label():<{width}}  {marks}  {metrics}")
    todo = [c for c in cells if not c.done]
    if todo:
        lines += ["  to fill the missing cells (or all at once: python run.py -m experiment=" + experiment + "):"]
        for c in todo:
            lines += [f"    {c.spec.command()}", f"      = {c.spec.explicit_command()}"]
    return lines, sum(c.done for c in cells), len(cells)


def parse_cli(argv: Iterable[str], allowed: Iterable[str]) -> dict[str, str]:
    """``key=value`` or ``--key value`` / ``--key=value`` arguments, restricted to ``allowed`` keys."""
    allowed = set(allowed)
    args = list(argv)
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, sep, value = a[2:].partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise TableError(f"{a} needs a value")
                i += 1
                value = args[i]
        else:
            key, sep, value = a.partition("=")
            if not sep:
                raise TableError(f"cannot parse argument {a!r}; use key=value ({', '.join(sorted(allowed))})")
        key = {"paths.results": "results"}.get(key.replace("-", "_"), key.replace("-", "_"))
        if key not in allowed:
            raise TableError(f"unknown argument {key!r}; use one of: {', '.join(sorted(allowed))}")
        out[key] = value
        i += 1
    return out


def results_arg(args: Mapping[str, str], config_dir: Path = CONFIG_DIR) -> Path:
    """The results folder: ``results=`` argument, else ``paths.results`` of the config (SKRR_RESULTS, local/)."""
    if args.get("results"):
        return Path(os.path.expanduser(args["results"]))
    return default_results(config_dir)
