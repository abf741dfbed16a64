"""Rendering a built table: markdown, LaTeX, CSV and the Fig. 5-style plot, written atomically together."""
from __future__ import annotations

import csv
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

from skrr.experiments.reference import Column, Row, Table, build_table, load_table
from skrr.experiments.results import CONFIG_DIR, experiment_cells
from skrr.io import atomic_write_bytes

log = logging.getLogger(__name__)


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


def footnotes(table: Table) -> list[str]:
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
    notes = footnotes(table)
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
    lines += [f"% {n}" for n in footnotes(table)]
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
# A metric measured with random weights (eval/backbones.py's tiny CLIP) is noise: tabled, flagged, never plotted.
RANDOM_BACKBONE = re.compile(r"random weights", re.IGNORECASE)


def encoder_of(row: Row) -> str:
    """The pipeline (hence text encoder) a row's cells ran on: one panel row of the plot each."""
    return row.cells[0].spec.cell.pipeline if row.cells else ""


def plot_panels(table: Table) -> tuple[list[str], list[Column], list[str]]:
    """What the plot shows: encoders (panel rows), columns (panels per row), and the columns left out.

    Cells on different encoders never share axes (22 M vs 0.07 M parameters). A column whose every measured
    value comes from a random-weight backbone is left out (it is noise; the table still lists it, flagged).
    """
    encoders = list(dict.fromkeys(encoder_of(r) for r in table.rows
                                  if any(v.ours is not None for v in r.values.values())))
    cols, left_out = [], []
    for c in table.spec.columns:
        measured = [r.values[c.key] for r in table.rows if r.values[c.key].ours is not None]
        if not measured:
            continue
        if all(v.backbones and all(RANDOM_BACKBONE.search(b) for b in v.backbones) for v in measured):
            left_out.append(c.label or c.key)
        else:
            cols.append(c)
    return encoders, cols, left_out


def render_plot(table: Table) -> bytes | None:
    """PNG bytes: one panel per column (one panel row per encoder), sparsity (%) vs value per method; paper
    numbers dashed. None if nothing is measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders, cols, left_out = plot_panels(table)
    if not cols:
        return None
    n = len(cols)
    if len(encoders) == 1:  # one encoder: wrap the columns, four panels a row
        ncols = min(n, 4)
        nrows = math.ceil(n / ncols)
        panels = [(encoders[0], c) for c in cols]
    else:
        ncols, nrows = n, len(encoders)
        panels = [(e, c) for e in encoders for c in cols]
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    groups: dict[str, list[Row]] = {}
    for row in table.rows:
        groups.setdefault(row.spec.name.split(" [")[0] if row.spec.method != "dense" else "Dense", []).append(row)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (encoder, c) in zip(axes.flat, panels):
        for gi, (name, group) in enumerate(groups.items()):
            rows = [r for r in group if encoder_of(r) == encoder]
            color = colors[gi % len(colors)]
            pts = sorted((r.spec.x if r.spec.x is not None else 100 * (r.realized if r.realized is not None
                                                                           else r.target), r.values[c.key].ours)
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
        title = (c.label or c.key) + (" [stand-in backbone]" if stand_in else "")
        ax.set_title(title if len(encoders) == 1 else f"{encoder}: {title}", fontsize=9)
        ax.set_xlabel(table.spec.x_label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    title = table.spec.title
    if left_out:
        title += f"\n(not plotted, random-weight backbone: {', '.join(left_out)})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93 if left_out else 0.95))
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

