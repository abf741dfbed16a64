"""Paper tables from the results on disk: experiment cells, metric files, markdown / LaTeX / CSV, plots.

Reads only the store (skrr/store.py); never W&B. An experiment (``configs/experiment/<name>.yaml``) lists
its cells as Hydra overrides in ``sweep.cells``; a table (``configs/table/<name>.yaml``) picks rows out of
one experiment by (method, tag, sparsity), names its columns (metric file + field) and holds the paper's
numbers (SPEC §6). Every row shows target and realized sparsity, our value, the paper's and the gap; a
number measured with a stand-in backbone is flagged and gets no gap.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skrr.io import atomic_write_bytes
from skrr.experiments.store import Cell, CellStore, StoreError, read_json

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
METHOD_LABELS = {"dense": "Dense", "shortgpt": "ShortGPT", "laco": "LaCo", "finercut": "FinerCut",
                 "skrr": "Skrr", "magnitude": "Magnitude"}
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


def _check_name(group: str, name: str, config_dir: Path) -> None:
    if not (Path(config_dir) / group / f"{name}.yaml").exists():
        raise TableError(f"unknown {group} {name!r}; choose one of: {', '.join(names(group, config_dir))} "
                         f"(configs/{group}/)")


def experiment_cells(experiment: str, config_dir: Path = CONFIG_DIR) -> list[ExperimentCell]:
    """Every cell of an experiment, each composed exactly as ``run.py experiment=<name> cell=<i>`` does."""
    _check_name("experiment", experiment, config_dir)
    (base,) = compose_configs(config_dir, [f"experiment={experiment}"])
    raw = [tuple(str(o) for o in overrides) for overrides in (OmegaConf.select(base, "sweep.cells") or [])]
    out = []
    for i, (overrides, cfg) in enumerate(zip(raw, compose_configs(config_dir, *[[f"experiment={experiment}", *o]
                                                                          for o in raw]))):
        cell = Cell(str(cfg.pipeline.name), str(cfg.hydra.runtime.choices["method"]), float(cfg.sparsity),
                    int(cfg.seed), str(cfg.tag or ""))
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


# ---------------------------------------------------------------------------- table specs
@dataclass(frozen=True)
class Column:
    """A table column: metric file, field inside it, label, number format and the paper's backbone."""

    key: str
    metric: str
    field: str = "value"
    label: str = ""
    fmt: str = ".3f"
    scale: float = 1.0  # shown value = field value x scale (e.g. 1000 for params_b -> millions)
    paper_backbone: str | None = None  # regex; None = any backbone not marked as a stand-in

    def comparable(self, record: MetricRecord) -> bool:
        """Whether a value measured this way may be set against the paper's number."""
        if record.comparable is not None:
            return record.comparable
        name = record.backbone or ""
        if name and STAND_IN.search(name):
            return False
        return self.paper_backbone is None or bool(re.search(self.paper_backbone, name, re.IGNORECASE))


@dataclass(frozen=True)
class RowSpec:
    """A table row: which cells (method, tag, target sparsity) and the paper's numbers for it."""

    method: str
    sparsity: float
    tag: str = ""
    label: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    paper_sparsity: float | None = None  # percent, as the paper prints it
    supported: bool = True
    note: str = ""

    def matches(self, cell: Cell) -> bool:
        return (cell.method == self.method and cell.tag == self.tag
                and abs(cell.sparsity - self.sparsity) < SPARSITY_TOL)

    @property
    def name(self) -> str:
        base = METHOD_LABELS.get(self.method, self.method)
        return self.label or (f"{base} [{self.tag}]" if self.tag else base)


@dataclass(frozen=True)
class TableSpec:
    """configs/table/<name>.yaml."""

    name: str
    title: str
    experiment: str
    columns: tuple[Column, ...]
    rows: tuple[RowSpec, ...]
    notes: tuple[str, ...] = ()
    plot: bool = True


def load_table(name: str, config_dir: Path = CONFIG_DIR) -> TableSpec:
    """Read a table definition (columns, rows, paper numbers) from configs/table/<name>.yaml."""
    _check_name("table", name, config_dir)
    raw = OmegaConf.to_container(OmegaConf.load(Path(config_dir) / "table" / f"{name}.yaml"), resolve=True)
    try:
        columns = tuple(Column(**c) for c in raw["columns"])
        rows = []
        for r in raw["rows"]:
            paper = dict(r.pop("paper", None) or {})
            psp = paper.pop("sparsity", None)
            rows.append(RowSpec(paper={k: float(v) for k, v in paper.items()},
                                paper_sparsity=None if psp is None else float(psp),
                                **{**r, "sparsity": float(r["sparsity"])}))
        unknown = sorted({k for r in rows for k in r.paper} - {c.key for c in columns})
        if unknown:
            raise TableError(f"configs/table/{name}.yaml: paper values for unknown columns {unknown}")
        return TableSpec(raw.get("name", name), raw.get("title", name), raw["experiment"], columns, tuple(rows),
                         tuple(raw.get("notes", ())), bool(raw.get("plot", True)))
    except (KeyError, TypeError) as err:
        raise TableError(f"configs/table/{name}.yaml is malformed ({type(err).__name__}: {err})") from err


def row_cells(spec: TableSpec, cells: Sequence[ExperimentCell]) -> list[tuple[RowSpec, list[ExperimentCell]]]:
    """The experiment cells behind each supported row; a row no cell fills is a config error."""
    out = []
    for row in spec.rows:
        if not row.supported:
            continue
        found = [c for c in cells if row.matches(c.cell)]
        if not found:
            raise TableError(f"table {spec.name}: row {row.name} (method={row.method} tag={row.tag!r} "
                             f"sparsity={row.sparsity}) is not a cell of experiment {spec.experiment}; "
                             f"add it to configs/experiment/{spec.experiment}.yaml")
        out.append((row, found))
    return out


# ---------------------------------------------------------------------------- building a table
@dataclass
class Value:
    """One table entry: our mean over seeds (None = missing), the paper's, comparability, provenance."""

    ours: float | None
    paper: float | None
    comparable: bool = True
    backbones: tuple[str, ...] = ()
    n_images: int | None = None
    labels: tuple[str, ...] = ()

    @property
    def gap(self) -> float | None:
        """ours - paper, only when both exist and the measurement is comparable."""
        if self.ours is None or self.paper is None or not self.comparable:
            return None
        return self.ours - self.paper


@dataclass
class Row:
    """A built row: spec, its cells on disk, sparsities and values per column."""

    spec: RowSpec
    cells: list[CellResult]
    values: dict[str, Value]

    @property
    def target(self) -> float:
        return self.spec.sparsity

    @property
    def realized(self) -> float | None:
        got = [c.realized_sparsity for c in self.cells if c.realized_sparsity is not None]
        return sum(got) / len(got) if got else None

    @property
    def complete(self) -> bool:
        return all(v.ours is not None for v in self.values.values())


@dataclass
class Table:
    """A built table: rows with values, the cells still to run, unsupported rows."""

    spec: TableSpec
    rows: list[Row]
    missing: list[CellResult]
    unsupported: list[RowSpec]

    @property
    def complete(self) -> bool:
        return not self.missing


def _value(column: Column, row: RowSpec, cells: Sequence[CellResult]) -> Value:
    records = [c.metrics.get(column.metric) for c in cells]
    paper = row.paper.get(column.key)
    if any(r is None or column.field not in r.values for r in records):
        return Value(None, paper)
    nums = [r.values[column.field] * column.scale for r in records]
    backbones = tuple(sorted({r.backbone for r in records if r.backbone}))
    n = [r.n_images for r in records if r.n_images is not None]
    labels = tuple(sorted({x for r in records for x in r.labels}))
    return Value(sum(nums) / len(nums), paper, all(column.comparable(r) for r in records), backbones,
                 min(n) if n else None, labels)


def build_table(spec: TableSpec, cells: Sequence[ExperimentCell], results: Path) -> Table:
    """Read every cell a table needs (all files first, so a corrupt one stops before anything is written)."""
    read: dict[int, CellResult] = {}
    rows = []
    for row, found in row_cells(spec, cells):
        got = [read.setdefault(c.index, read_cell(results, c)) for c in found]
        rows.append(Row(row, got, {col.key: _value(col, row, got) for col in spec.columns}))
    needed = {col.metric for col in spec.columns}
    missing = [c for c in read.values()
               if not all(c.stages.values()) or any(m not in c.metrics for m in needed)]
    return Table(spec, rows, sorted(missing, key=lambda c: c.spec.index),
                 [r for r in spec.rows if not r.supported])


# ---------------------------------------------------------------------------- rendering
DASH = "—"


def _pct(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, fmt: str, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return format(x, ("+" if signed else "") + fmt)


def _stand_in_marks(table: Table) -> dict[str, str]:
    """Footnote letter per stand-in backbone name, in order of appearance."""
    marks: dict[str, str] = {}
    for row in table.rows:
        for v in row.values.values():
            if v.ours is not None and not v.comparable:
                for b in v.backbones or ("(unnamed backbone)",):
                    marks.setdefault(b, "abcdefghijklmnopqrstuvwxyz"[len(marks) % 26])
    return marks


def _grid(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and body rows shared by markdown, LaTeX: per table row three lines (ours, paper, gap)."""
    cols = table.spec.columns
    marks = _stand_in_marks(table)
    header = ["Method", "Target %", "Realized %", "", *[c.label or c.key for c in cols]]
    body = []
    for row in table.rows:
        ours = []
        for c in cols:
            v = row.values[c.key]
            text = _num(v.ours, c.fmt)
            if v.ours is not None and not v.comparable:
                text += "^" + ",".join(marks[b] for b in (v.backbones or ("(unnamed backbone)",)))
            ours.append(text)
        has_paper = bool(row.spec.paper) or row.spec.paper_sparsity is not None
        body.append([row.spec.name, _pct(row.target, 1), _pct(row.realized), "ours", *ours])
        if has_paper:
            psp = DASH if row.spec.paper_sparsity is None else f"{row.spec.paper_sparsity:.1f}"
            body.append(["", "", psp, "paper", *[_num(row.values[c.key].paper, c.fmt) for c in cols]])
            if all(v.ours is None for v in row.values.values()):
                continue  # nothing measured yet: no gap line
            gaps = []
            for c in cols:
                v = row.values[c.key]
                gaps.append("n/c" if (v.ours is not None and v.paper is not None and not v.comparable)
                            else _num(v.gap, c.fmt, signed=True))
            body.append(["", "", "", "Δ", *gaps])
    for row in table.unsupported:
        psp = DASH if row.paper_sparsity is None else f"{row.paper_sparsity:.1f}"
        body.append([row.name, _pct(row.sparsity, 1), DASH, "ours", *["not supported yet"] + [""] * (len(cols) - 1)])
        body.append(["", "", psp, "paper", *[_num(row.paper.get(c.key), c.fmt) for c in cols]])
    return header, body


def _footnotes(table: Table) -> list[str]:
    """Stand-in backbones, provenance per column, unsupported rows, the table's own notes."""
    out = [f"^{m} measured with `{b}`: a stand-in, not the paper's backbone; not comparable with the "
           f"paper's numbers (gap shown as n/c)." for b, m in _stand_in_marks(table).items()]
    for metric in dict.fromkeys(c.metric for c in table.spec.columns):
        vals = [r.values[c.key] for r in table.rows for c in table.spec.columns if c.metric == metric]
        seen = sorted({b for v in vals for b in v.backbones})
        ns = sorted({v.n_images for v in vals if v.n_images is not None})
        how = sorted({x for v in vals for x in v.labels})
        if seen or ns or how:
            labels = ", ".join(c.label or c.key for c in table.spec.columns if c.metric == metric)
            parts = [f"backbone {', '.join(seen)}" if seen else "",
                     (f"images: {ns[0]}" + (f"–{ns[-1]}" if len(ns) > 1 else "")) if ns else "", ", ".join(how)]
            out.append(f"{labels} (metrics/{metric}.json): " + "; ".join(p for p in parts if p) + ".")
    for r in table.unsupported:
        out.append(f"{r.name}: not supported yet — {r.note}".rstrip(" —"))
    out += list(table.spec.notes)
    return out


def missing_lines(table: Table) -> list[str]:
    """One entry per incomplete cell: what is missing and the two equivalent commands that fill it."""
    needed = sorted({c.metric for c in table.spec.columns})
    out = []
    for c in table.missing:
        stages = [s for s, ok in c.stages.items() if not ok]
        metrics = [m for m in needed if m not in c.metrics]
        what = ", ".join(filter(None, [f"stages {'/'.join(stages)}" if stages else "",
                                       f"metrics {'/'.join(metrics)}" if metrics else ""]))
        out += [f"cell {c.spec.index} {c.spec.cell.label()} (missing {what}):",
                f"    {c.spec.command()}", f"    {c.spec.explicit_command()}"]
    return out


def render_markdown(table: Table) -> str:
    """The table as GitHub markdown: rows of ours / paper / Δ, footnotes, missing cells with commands."""
    header, body = _grid(table)
    esc = [[t.replace("|", "\\|") for t in line] for line in [header, *body]]
    lines = [f"# {table.spec.title}", "",
             f"Experiment `{table.spec.experiment}`; Δ = ours − paper. Sparsity = removed / all encoder "
             f"parameters, embedding included (SPEC §1).", "",
             "| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in esc[1:]]
    notes = _footnotes(table)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if table.missing:
        lines += ["", f"## Missing: {len(table.missing)} cell(s)", "", "```", *missing_lines(table), "```"]
    else:
        lines += ["", "All cells complete."]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    out = "".join(repl.get(ch, ch) for ch in text)
    return out.replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$").replace("Δ", r"$\Delta$").replace(
        "—", "--").replace("−", "-")


def render_latex(table: Table) -> str:
    """The table as a booktabs LaTeX tabular (stand-in marks become superscripts)."""
    header, body = _grid(table)

    def cell(t: str) -> str:
        if "^" in t and not t.startswith("^"):
            num, mark = t.split("^", 1)
            return f"{_tex(num)}$^{{{mark}}}$"
        return _tex(t)

    lines = [r"% generated by scripts/make_table.py from the results on disk; do not edit",
             r"\begin{tabular}{l" + "r" * 2 + "l" + "r" * (len(header) - 4) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for i, line in enumerate(body):
        if i and line[3] == "ours":
            lines.append(r"\midrule")
        lines.append(" & ".join(cell(t) for t in line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in _footnotes(table)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["table", "row", "method", "tag", "pipeline", "cells", "target_sparsity", "realized_sparsity",
              "paper_sparsity", "column", "metric", "field", "ours", "paper", "gap", "comparable", "backbone",
              "n_images", "status"]


def render_csv(table: Table) -> str:
    """Long format: one line per (row, column), with sparsities, both values, gap and provenance."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in table.rows:
        for c in table.spec.columns:
            v = row.values[c.key]
            w.writerow({"table": table.spec.name, "row": row.spec.name, "method": row.spec.method,
                        "tag": row.spec.tag, "pipeline": row.cells[0].spec.cell.pipeline,
                        "cells": ";".join(str(x.spec.index) for x in row.cells),
                        "target_sparsity": row.target, "realized_sparsity": _opt(row.realized),
                        "paper_sparsity": _opt(None if row.spec.paper_sparsity is None else
                                               row.spec.paper_sparsity / 100),
                        "column": c.key, "metric": c.metric, "field": c.field, "ours": _opt(v.ours),
                        "paper": _opt(v.paper), "gap": _opt(v.gap), "comparable": int(v.comparable),
                        "backbone": ";".join(v.backbones), "n_images": _opt(v.n_images),
                        "status": "done" if v.ours is not None else "missing"})
    for r in table.unsupported:
        for c in table.spec.columns:
            w.writerow({"table": table.spec.name, "row": r.name, "method": r.method, "tag": r.tag,
                        "target_sparsity": r.sparsity, "column": c.key, "metric": c.metric, "field": c.field,
                        "paper": _opt(r.paper.get(c.key)), "status": "not supported yet"})
    return buf.getvalue()


def _opt(x: Any) -> Any:
    """Empty for missing; floats rounded to 10 significant digits (no 0.30000000000000004 in the CSV)."""
    if x is None:
        return ""
    return float(f"{x:.10g}") if isinstance(x, float) else x


# ---------------------------------------------------------------------------- plots (Fig. 5 style)
def render_plot(table: Table) -> bytes | None:
    """PNG bytes: one panel per column, sparsity (%) vs value per method; paper numbers dashed. None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in table.spec.columns if any(r.values[c.key].ours is not None for r in table.rows)]
    if not cols:
        return None
    n = len(cols)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    groups: dict[str, list[Row]] = {}
    for row in table.rows:
        groups.setdefault(row.spec.name.split(" [")[0] if row.spec.method != "dense" else "Dense", []).append(row)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, c in zip(axes.flat, cols):
        for gi, (name, rows) in enumerate(groups.items()):
            color = colors[gi % len(colors)]
            pts = sorted((100 * (r.realized if r.realized is not None else r.target), r.values[c.key].ours)
                         for r in rows if r.values[c.key].ours is not None)
            paper = sorted((r.spec.paper_sparsity, r.values[c.key].paper) for r in rows
                           if r.values[c.key].paper is not None and r.spec.paper_sparsity is not None)
            if name == "Dense":
                if pts:
                    ax.axhline(pts[0][1], color=color, lw=1, ls=":", label="Dense")
                if paper:
                    ax.axhline(paper[0][1], color=color, lw=1, ls=":", alpha=0.5, label="Dense (paper)")
                continue
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=name)
            if paper:
                ax.plot(*zip(*paper), marker="o", mfc="none", ls="--", color=color, alpha=0.6,
                        label=f"{name} (paper)")
        stand_in = any(not r.values[c.key].comparable for r in table.rows if r.values[c.key].ours is not None)
        ax.set_title((c.label or c.key) + (" [stand-in backbone]" if stand_in else ""), fontsize=9)
        ax.set_xlabel("realized sparsity (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    fig.suptitle(table.spec.title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- writing
def write_table(table: Table, out_dir: Path, plot: bool = True) -> list[Path]:
    """Render everything in memory, then write <name>.md/.tex/.csv (+ .png) atomically; returns the paths."""
    out_dir = Path(out_dir)
    files: dict[Path, bytes] = {
        out_dir / f"{table.spec.name}.md": render_markdown(table).encode(),
        out_dir / f"{table.spec.name}.tex": render_latex(table).encode(),
        out_dir / f"{table.spec.name}.csv": render_csv(table).encode(),
    }
    if plot and table.spec.plot:
        png = render_plot(table)
        if png is not None:
            files[out_dir / f"{table.spec.name}.png"] = png
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return list(files)


def make_table(name: str, results: Path, config_dir: Path = CONFIG_DIR, plot: bool = True) -> tuple[Table, list[Path]]:
    """Build table ``name`` from ``results`` and write it under ``<results>/tables/``."""
    spec = load_table(name, config_dir)
    table = build_table(spec, experiment_cells(spec.experiment, config_dir), Path(results))
    return table, write_table(table, Path(results) / "tables", plot)


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
