"""The paper's reference numbers (``configs/table/<name>.yaml``, SPEC §6) and the tables that set ours beside them.

A table picks rows out of one experiment by (method, tag, quantize, sparsity), names its columns (metric file + field)
and holds the paper's numbers. Every row carries target and realized sparsity, our value, the paper's and the
gap; a number measured with a stand-in backbone is flagged and gets no gap.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from skrr.experiments.results import (CONFIG_DIR, SPARSITY_TOL, STAND_IN, CellResult, ExperimentCell, MetricRecord,
                                      TableError, check_name, read_cell)
from skrr.experiments.store import Cell

METHOD_LABELS = {"dense": "Dense", "shortgpt": "ShortGPT", "laco": "LaCo", "finercut": "FinerCut",
                 "skrr": "Skrr", "magnitude": "Magnitude", "wanda": "Wanda"}


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
    """A table row: which cells (method, tag, text-encoder quantization, target sparsity) and the paper's numbers."""

    method: str
    sparsity: float
    tag: str = ""
    quantize: str = "none"  # a row of quantized cells (Table 2's "Dense int8", "Skrr + int8")
    label: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    paper_sparsity: float | None = None  # percent, as the paper prints it
    supported: bool = True
    note: str = ""
    x: float | None = None  # plot position in percent when the plotted sparsity is not the cell's (SD2's U-Net)

    def matches(self, cell: Cell) -> bool:
        return (cell.method == self.method and cell.tag == self.tag and cell.quantize == self.quantize
                and abs(cell.sparsity - self.sparsity) < SPARSITY_TOL)

    @property
    def name(self) -> str:
        base = METHOD_LABELS.get(self.method, self.method)
        base = f"{base} [{self.tag}]" if self.tag else base
        return self.label or (f"{base} + {self.quantize}" if self.quantize != "none" else base)


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
    x_label: str = "realized sparsity (%)"  # the plot's x axis (rows with ``x`` use their own position)


def load_table(name: str, config_dir: Path = CONFIG_DIR) -> TableSpec:
    """Read a table definition (columns, rows, paper numbers) from configs/table/<name>.yaml."""
    check_name("table", name, config_dir)
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
                         tuple(raw.get("notes", ())), bool(raw.get("plot", True)),
                         str(raw.get("x_label", "realized sparsity (%)")))
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
                             f"quantize={row.quantize} sparsity={row.sparsity}) is not a cell of experiment {spec.experiment}; "
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

