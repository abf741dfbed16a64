"""Tables from fake results: values, paper numbers and gaps, stand-in backbones, missing cells, corrupt files."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from skrr.io import atomic_write_json
from skrr.experiments.store import Cell, StoreError
from skrr.experiments.reference import Column, build_table, load_table
from skrr.experiments.render import make_table, render_csv, render_latex, render_markdown, render_plot
from skrr.experiments.results import MetricRecord, TableError, experiment_cells, read_metric, status_lines

REPO = Path(__file__).resolve().parent.parent
INCEPTION = "inception-v3 (clean-fid torchscript, pool3 2048-d)"
STAND_IN = "efficientnet-lite0 (NOT Inception-v3; relative only)"

# A miniature config tree with the same shape as configs/: root config, groups, one experiment, two tables.
CONFIGS = {
    "config.yaml": """
defaults:
  - pipeline: tiny
  - method: dense
  - eval: none
  - _self_
  - experiment: null
sparsity: 0.419
seed: 0
tag: ""
experiment: adhoc
stages: [search, generate, score]
cell: null
search_sparsities: []
sweep: {cells: []}
paths: {root: ., results: "${paths.root}/results"}
""",
    "pipeline/tiny.yaml": "name: tiny\n",
    "pipeline/big.yaml": "name: big\n",
    "method/dense.yaml": "name: dense\n",
    "method/skrr.yaml": "name: skrr\nbeam_width: 3\n",
    "eval/none.yaml": "# @package eval\n{}\n",
    "eval/fid.yaml": "# @package eval.fid\nmetric: fid\n",
    "eval/geneval.yaml": "# @package eval.geneval\nmetric: geneval\n",
    "experiment/mini.yaml": """# @package _global_
defaults:
  - override /pipeline: big
  - override /eval: [fid, geneval]
experiment: mini
sweep:
  cells:
    - [method=dense, sparsity=0]
    - [method=skrr, sparsity=0.270, "search_sparsities=[0.270,0.419]"]
    - [method=skrr, sparsity=0.419, "search_sparsities=[0.270,0.419]"]
    - [method=skrr, sparsity=0.419, tag=k1, method.beam_width=1]
hydra: {sweeper: {params: {cell: "range(0,4)"}}}
""",
    "table/mini.yaml": """
name: mini
title: Mini table
experiment: mini
columns:
  - {key: fid, metric: fid, label: "FID↓", fmt: ".2f", paper_backbone: inception}
  - {key: two, metric: geneval, field: tasks.two_object, label: Two, fmt: ".3f"}
  - {key: overall, metric: geneval, label: Overall, fmt: ".3f"}
rows:
  - {method: dense, sparsity: 0.0, paper: {sparsity: 0.0, fid: 22.89, two: 0.616, overall: 0.539}}
  - {method: skrr, sparsity: 0.270, paper: {sparsity: 27.0, fid: 20.15, two: 0.434, overall: 0.471}}
  - {method: skrr, sparsity: 0.419, paper: {sparsity: 41.9, fid: 19.93, two: 0.410, overall: 0.442}}
  - {method: skrr, sparsity: 0.419, tag: all, supported: false, note: needs one plan per encoder,
     paper: {sparsity: 41.9, overall: 0.579}}
""",
    "table/stray.yaml": """
name: stray
experiment: mini
columns: [{key: fid, metric: fid}]
rows: [{method: laco, sparsity: 0.243}]
""",
}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("configs")
    for rel, text in CONFIGS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def cells(config_dir: Path) -> list:
    return experiment_cells("mini", config_dir)


def fill(results: Path, cell: Cell, realized: float, fid: float, fid_backbone: str = INCEPTION,
         geneval: bool = True) -> Path:
    """Write what run.py leaves in a finished cell: stage records, plan, metric files."""
    d = results / cell.relpath()
    for stage in ("search", "generate", "score"):
        atomic_write_json(d / "stages" / f"{stage}.json", {"stage": stage})
    atomic_write_json(d / "plan.json", {"format": "skrr-plan/1", "meta": {"realized_sparsity": realized,
                                                                           "target_sparsity": cell.sparsity}})
    atomic_write_json(d / "metrics" / "fid.json", {"metric": "fid", "value": fid, "n_images": 30000, "mode": "clean",
                                                   "backbone": fid_backbone, "realized_sparsity": realized})
    if geneval:
        atomic_write_json(d / "metrics" / "geneval.json", {
            "metric": "geneval", "value": 0.45, "n_images": 2212, "realized_sparsity": realized,
            "backbone": "facebook/mask2former-swin-small-coco-instance",
            "per_task": {"single_object": 0.9, "two_object": 0.4, "counting": 0.45, "colors": 0.75,
                         "position": 0.05, "color_attr": 0.07}})
    return d


def script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def md_row(markdown: str, first: str, source: str, after: str = "") -> list[str]:
    """Cells of the markdown line whose 4th column is `source` (ours|paper|Δ) in the group starting with `first`."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.split("|")[1].strip() == first and after in ln)
    for ln in lines[start:]:
        parts = [p.strip() for p in ln.strip("|").split("|")]
        if parts[3] == source:
            return parts
    raise AssertionError(f"no {source} line for {first}")


def test_cells_follow_the_experiment(cells: list) -> None:
    assert [c.cell.label() for c in cells] == ["big/dense/s0.000/seed0", "big/skrr/s0.270/seed0",
                                               "big/skrr/s0.419/seed0", "big/skrr-k1/s0.419/seed0"]
    assert cells[1].metrics == ("fid", "geneval")
    assert cells[2].command() == "python run.py experiment=mini cell=2"
    assert cells[2].explicit_command() == ("python run.py experiment=mini pipeline=big method=skrr sparsity=0.419 "
                                           "'search_sparsities=[0.270,0.419]'")
    assert cells[3].explicit_command().endswith("tag=k1 method.beam_width=1")


def test_markdown_values_gap_sparsity_and_backbone(tmp_path: Path, config_dir: Path, cells: list) -> None:
    fill(tmp_path, cells[0].cell, 0.0, 22.50)
    fill(tmp_path, cells[2].cell, 0.41923, 20.00)
    fill(tmp_path, cells[1].cell, 0.28113, 21.00, fid_backbone=STAND_IN)
    table = build_table(load_table("mini", config_dir), cells, tmp_path)
    md = render_markdown(table)

    ours = md_row(md, "Skrr", "ours", after="| 41.9 |")
    assert ours[:3] == ["Skrr", "41.9", "41.92"]          # target beside realized
    assert ours[4:7] == ["20.00", "0.400", "0.450"]
    assert md_row(md, "Skrr", "paper", after="| 41.9 |")[2:7] == ["41.9", "paper", "19.93", "0.410", "0.442"]
    assert md_row(md, "Skrr", "Δ", after="| 41.9 |")[4:7] == ["+0.07", "-0.010", "+0.008"]
    assert md_row(md, "Dense", "Δ")[4] == "-0.39"

    # A stand-in backbone: value flagged, named in a footnote, no gap against the paper.
    ours27 = md_row(md, "Skrr", "ours", after="| 27.0 |")
    assert ours27[2] == "28.11" and ours27[4] == "21.00^a"
    assert md_row(md, "Skrr", "Δ", after="| 27.0 |")[4] == "n/c"
    assert f"^a measured with `{STAND_IN}`" in md and "not comparable" in md
    # The unsupported row is shown as such and is not a missing cell.
    assert "not supported yet" in md and "needs one plan per encoder" in md
    assert f"FID↓ (metrics/fid.json): backbone {STAND_IN}, {INCEPTION}; images: 30000; mode=clean." in md
    assert table.complete and "All cells complete." in md


def test_csv_is_long_and_exact(tmp_path: Path, config_dir: Path, cells: list) -> None:
    fill(tmp_path, cells[2].cell, 0.41923, 20.00)
    rows = list(csv.DictReader(io.StringIO(render_csv(build_table(load_table("mini", config_dir), cells,
                                                                   tmp_path)))))
    fid = next(r for r in rows if r["row"] == "Skrr" and r["target_sparsity"] == "0.419" and r["column"] == "fid")
    assert (float(fid["ours"]), float(fid["paper"]), fid["realized_sparsity"]) == (20.0, 19.93, "0.41923")
    assert fid["gap"] == "0.07" and fid["status"] == "done" and fid["backbone"] == INCEPTION
    dense = next(r for r in rows if r["row"] == "Dense" and r["column"] == "overall")
    assert dense["status"] == "missing" and dense["ours"] == "" and dense["paper"] == "0.539"
    assert any(r["status"] == "not supported yet" for r in rows)


def test_latex_escapes(tmp_path: Path, config_dir: Path, cells: list) -> None:
    fill(tmp_path, cells[1].cell, 0.28113, 21.00, fid_backbone=STAND_IN)
    tex = render_latex(build_table(load_table("mini", config_dir), cells, tmp_path))
    assert r"Target \%" in tex and r"FID$\downarrow$" in tex and r"$\Delta$" in tex
    assert r"21.00$^{a}$" in tex and r"\begin{tabular}" in tex and r"\end{tabular}" in tex


def test_missing_cells_listed_with_commands_and_exit_code(tmp_path: Path, config_dir: Path, cells: list,
                                                          capsys: pytest.CaptureFixture) -> None:
    fill(tmp_path, cells[0].cell, 0.0, 22.50)
    d = fill(tmp_path, cells[2].cell, 0.41923, 20.00)
    (d / "metrics" / "geneval.json").unlink()               # cell 2: stages done, one metric missing
    rc = script("make_table").main(["table=mini", f"results={tmp_path}", f"config_dir={config_dir}"])
    out = capsys.readouterr().out
    assert rc == 2 and "INCOMPLETE: 2 cell(s) missing" in out
    md = (tmp_path / "tables" / "mini.md").read_text()
    for text in (out, md):
        assert "python run.py experiment=mini cell=1" in text
        assert "python run.py experiment=mini pipeline=big method=skrr sparsity=0.270" in text
        assert "cell 2 big/skrr/s0.419/seed0 (missing metrics geneval)" in text
    assert "cell=0" not in md and "cell=3" not in md          # complete, and not in this table
    assert {p.suffix for p in (tmp_path / "tables").iterdir()} == {".md", ".tex", ".csv", ".png"}


def test_complete_table_exits_zero(tmp_path: Path, config_dir: Path, cells: list) -> None:
    for c, realized in zip(cells[:3], (0.0, 0.28, 0.419)):
        fill(tmp_path, c.cell, realized, 20.0)
    table, files = make_table("mini", tmp_path, config_dir)
    assert table.complete and all(f.exists() for f in files)
    assert script("make_table").main(["table=mini", f"results={tmp_path}", f"config_dir={config_dir}",
                                      "plot=false"]) == 0


def test_corrupt_metric_file_is_one_line_error_and_writes_nothing(tmp_path: Path, config_dir: Path, cells: list,
                                                                 capsys: pytest.CaptureFixture) -> None:
    for c in cells[:3]:
        fill(tmp_path, c.cell, 0.3, 20.0)
    assert script("make_table").main(["table=mini", f"results={tmp_path}", f"config_dir={config_dir}"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()}
    bad = tmp_path / cells[2].cell.relpath() / "metrics" / "fid.json"
    bad.write_text('{"metric": "fid", "value": 2')          # a torn write
    (tmp_path / cells[0].cell.relpath() / "metrics" / "fid.json").write_text(json.dumps(
        {"metric": "fid", "value": 99.0, "backbone": INCEPTION}))
    capsys.readouterr()
    rc = script("make_table").main(["table=mini", f"results={tmp_path}", f"config_dir={config_dir}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and str(bad) in err and "corrupt" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()} == before
    with pytest.raises(StoreError, match="fid.json is corrupt"):
        read_metric(bad)


def test_row_outside_its_experiment_is_refused(config_dir: Path, cells: list, tmp_path: Path) -> None:
    with pytest.raises(TableError, match="laco.*not a cell of experiment mini"):
        build_table(load_table("stray", config_dir), cells, tmp_path)
    with pytest.raises(TableError, match="unknown table 'nope'"):
        load_table("nope", config_dir)


def test_read_metric_normalises_cost_and_geneval(tmp_path: Path) -> None:
    p = tmp_path / "cost.json"
    p.write_text(json.dumps({"metric": "cost", "params": {"text_encoder": 2_000_000_000, "total": 3_430_000_000},
                             "memory_gib": 6.46, "tflops": 91.9, "memory_kind": "bf16-bytes"}))
    rec = read_metric(p)
    assert rec.values["params_b"] == pytest.approx(3.43) and rec.values["memory_gb"] == 6.46
    assert rec.values["params.text_encoder"] == 2e9 and rec.backbone is None
    p.write_text(json.dumps({"metric": "cost", "params": 5_420_000_000, "memory_gb": 10.18, "tflops": 91.94}))
    assert read_metric(p).values["params_b"] == pytest.approx(5.42)
    p.write_text(json.dumps({"value": 0.44, "tasks": {"counting": 0.45}, "backbone": "m2f", "n_images": 8}))
    rec = read_metric(p)
    assert rec.values == {"value": 0.44, "tasks.counting": 0.45, "n_images": 8.0} and rec.n_images == 8
    p.write_text(json.dumps({"value": 0.44, "per_task": {"colors": 0.7}, "mode": "official rules", "info": {}}))
    rec = read_metric(p)
    assert rec.values["tasks.colors"] == 0.7 and rec.labels == ("mode=official rules",)


def test_comparability_of_backbones() -> None:
    col = Column("fid", "fid", paper_backbone="inception")
    rec = lambda b, flag=None: MetricRecord({}, b, None, None, flag)  # noqa: E731
    assert col.comparable(rec(INCEPTION))
    assert not col.comparable(rec(STAND_IN))                # mentions Inception, but says NOT
    assert not col.comparable(rec("dino-vitb16"))
    assert not col.comparable(rec(INCEPTION, flag=False))   # an explicit flag from the evaluator wins
    assert Column("p", "cost").comparable(rec(None))


def test_status_lists_stages_and_commands(tmp_path: Path, config_dir: Path) -> None:
    cells = experiment_cells("mini", config_dir)
    d = fill(tmp_path, cells[0].cell, 0.0, 22.0)
    (d / "stages" / "score.json").unlink()
    fill(tmp_path, cells[3].cell, 0.419, 20.0)
    lines, done, total = status_lines("mini", tmp_path, config_dir)
    text = "\n".join(lines)
    assert (done, total) == (1, 4) and "1/4 cells done" in text
    row0 = next(ln for ln in lines if "big/dense/s0.000/seed0" in ln)
    assert row0.split()[2:5] == ["done", "done", "-"]
    assert "python run.py experiment=mini cell=0" in text and "cell=3" not in text
    assert "python run.py experiment=mini pipeline=big method=skrr sparsity=0.270" in text


def test_plot_is_a_png(tmp_path: Path, config_dir: Path, cells: list) -> None:
    assert render_plot(build_table(load_table("mini", config_dir), cells, tmp_path)) is None  # nothing yet
    fill(tmp_path, cells[1].cell, 0.28, 21.0)
    fill(tmp_path, cells[2].cell, 0.419, 20.0)
    png = render_plot(build_table(load_table("mini", config_dir), cells, tmp_path))
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_arguments() -> None:
    from skrr.experiments.results import parse_cli

    allowed = {"table", "results", "plot"}
    assert parse_cli(["table=table1", "paths.results=/r"], allowed) == {"table": "table1", "results": "/r"}
    assert parse_cli(["--table", "table2", "--results=/x"], allowed) == {"table": "table2", "results": "/x"}
    with pytest.raises(TableError, match="unknown argument 'colour'"):
        parse_cli(["colour=red"], allowed)
    with pytest.raises(TableError, match="cannot parse argument 'table1'"):
        parse_cli(["table1"], allowed)


def test_plot_gives_each_encoder_its_panel_row_and_leaves_random_backbones_out() -> None:
    from types import SimpleNamespace

    from eval.backbones import EFFNET_FID_NAME, TINY_CLIP_NAME
    from skrr.experiments.reference import Column, Row, RowSpec, Table, TableSpec, Value
    from skrr.experiments.render import plot_panels

    cols = (Column("fid", "fid", label="FID"), Column("clip", "clip", label="CLIP"),
            Column("params", "cost", "params_b", label="Param"))

    def row(method: str, pipeline: str, sparsity: float) -> Row:
        cell = SimpleNamespace(spec=SimpleNamespace(cell=Cell(pipeline, method, sparsity)), realized_sparsity=sparsity)
        values = {"fid": Value(1.0, None, False, (EFFNET_FID_NAME,)),
                  "clip": Value(-0.28, None, False, (TINY_CLIP_NAME,)), "params": Value(0.02, None)}
        return Row(RowSpec(method, sparsity), [cell], values)

    rows = [row("dense", "tiny_minilm", 0.0), row("skrr", "tiny_minilm", 0.157), row("skrr", "tiny", 0.2)]
    table = Table(TableSpec("demo", "Demo", "demo", cols, ()), rows, [], [])
    encoders, shown, left_out = plot_panels(table)
    assert encoders == ["tiny_minilm", "tiny"]  # MiniLM and tiny-T5 cells never share axes
    assert [c.key for c in shown] == ["fid", "params"] and left_out == ["CLIP"]  # stand-in kept, random dropped
    png = render_plot(table)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
