"""quantize= on a run.py cell (issue 13, part 4): the (pruned) text encoder is quantized inside the pipeline before
generation and cost, the cell has its own folder, and unquantized cells keep their signature and folder."""
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402

pytest.importorskip("torchao")

CELL = ["pipeline=tiny", "method=shortgpt", "sparsity=0.3", "eval=offline", "~eval.fid", "~eval.dreamsim",
        "eval.clip.prompts.samples_per_prompt=1"]


def test_an_int8_cell_quantizes_its_encoder_in_its_own_folder(tmp_path, monkeypatch):
    import torch

    from skrr.experiments.stages import LazyPipeline
    from skrr.pipelines import PipelineSpec, text_encoder_of
    from skrr.plan import PruningPlan

    monkeypatch.setenv("SKRR_CACHE", str(tmp_path / "cache"))
    run.cli([f"paths.results={tmp_path}", "logger=none", *CELL, "quantize=int8"])
    cell = tmp_path / "runs/tiny/shortgpt+int8/s0.300/seed0"
    assert not (tmp_path / "runs/tiny/shortgpt").exists()  # never the unquantized cell's folder
    meta = json.loads((cell / "cell.json").read_text())
    assert meta["cell"]["quantize"] == "int8" and meta["config"]["quantize"] == "int8"
    assert {p.stem for p in (cell / "stages").glob("*.json")} == {"search", "generate", "score"}
    generation = json.loads((cell / "images/tiny/generation.json").read_text())
    assert generation["extra"]["quantize"] == "int8"  # the images' identity names the quantized encoder
    cost = json.loads((cell / "metrics/cost.json").read_text())
    assert cost["quantize"] == {"text_encoder": "int8"}
    # The pipeline a cell builds carries torchao-quantized linear weights in its (pruned) text encoder
    spec = PipelineSpec.from_config(OmegaConf.load(ROOT / "configs/pipeline/tiny.yaml"))
    plan = PruningPlan.from_json(cell / "plan.json")
    pipe = LazyPipeline(spec, plan, torch.device("cpu"), quantize="int8").get()
    linears = [m for m in text_encoder_of(pipe, spec).modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ != "Parameter" and hasattr(m.weight, "__tensor_flatten__")
                           for m in linears)


def test_an_unquantized_cell_keeps_its_signature_and_folder():
    from skrr.experiments.store import Cell, short_hash

    cfg = run._composed(["pipeline=tiny", "method=skrr", "sparsity=0.3"])
    assert cfg.quantize == "none"
    without = OmegaConf.create(OmegaConf.to_container(cfg))
    del without["quantize"]  # the config before this feature existed
    assert short_hash(run.config_that_matters(cfg)) == short_hash(run.config_that_matters(without))
    int8 = OmegaConf.merge(cfg, {"quantize": "int8"})
    assert short_hash(run.config_that_matters(int8)) != short_hash(run.config_that_matters(cfg))
    assert Cell("tiny", "skrr", 0.3, 0, "", "none").relpath() == Cell("tiny", "skrr", 0.3, 0).relpath()
    assert Cell("tiny", "skrr", 0.3, 0, "k1").relpath().as_posix() == "runs/tiny/skrr-k1/s0.300/seed0"
    assert Cell("tiny", "skrr", 0.3, 0, "k1", "int8").relpath().as_posix() == "runs/tiny/skrr-k1+int8/s0.300/seed0"


def test_mem_counts_the_quantized_encoder_by_its_real_bytes():
    import torch

    from eval.efficiency import GIB, measure_cost
    from skrr.experiments.stages import generation_settings
    from skrr.pipelines import PipelineSpec, load_pipeline, text_encoder_of
    from skrr.quantize import quantize_encoder, stored_bytes

    spec = PipelineSpec.from_config(OmegaConf.load(ROOT / "configs/pipeline/tiny.yaml"))
    settings = generation_settings(run._composed(["pipeline=tiny"]))
    pipe = load_pipeline(spec, torch.device("cpu"))
    dense = measure_cost(pipe, settings)
    encoder = text_encoder_of(pipe, spec)
    linears = {id(m): m for m in encoder.modules() if isinstance(m, torch.nn.Linear)}.values()
    bf16 = sum(m.weight.numel() * 2 for m in linears)
    quantize_encoder(encoder, "int8")
    int8 = sum(stored_bytes(m.weight) for m in linears)
    assert 0 < int8 < bf16 * 0.6  # int8 data + one scale per output channel: about half of bf16
    q = measure_cost(pipe, settings)
    assert q.params == dense.params  # quantization removes no parameter
    assert round((dense.memory_gib - q.memory_gib) * GIB) == bf16 - int8
    assert q.quantize == {"text_encoder": "int8"} and dense.quantize == {"text_encoder": "none"}


def test_table2_int8_rows_read_the_quantized_cells_only():
    from skrr.experiments.reference import load_table, row_cells
    from skrr.experiments.results import experiment_cells

    rows = {row.name: [c.cell.relpath().as_posix() for c in found]
            for row, found in row_cells(load_table("table2"), experiment_cells("table2"))}
    assert rows["Skrr"] == ["runs/pixart_sigma/skrr/s0.419/seed0"]
    assert rows["Skrr + int8"] == ["runs/pixart_sigma/skrr+int8/s0.419/seed0"]
    assert rows["Dense"] == ["runs/pixart_sigma/dense/s0.000/seed0"]
    assert rows["Dense int8"] == ["runs/pixart_sigma/dense+int8/s0.000/seed0"]


def test_drop_t5_runs_sd3_without_its_t5_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SKRR_CACHE", str(tmp_path / "cache"))
    run.cli([f"paths.results={tmp_path}", "logger=none", "pipeline=tiny_sd3", "method=dense", "sparsity=0",
             "drop_text_encoder=true", "eval=offline", "~eval.fid", "~eval.dreamsim", "~eval.clip"])
    cell = tmp_path / "runs/tiny_sd3/dense-drop_t5/s0.000/seed0"
    assert json.loads((cell / "cell.json").read_text())["config"]["drop_text_encoder"] is True
    cost = json.loads((cell / "metrics/cost.json").read_text())
    assert set(cost["params"]) == {"text_encoder", "text_encoder_2", "denoiser", "vae_decoder", "total"}  # no T5
    assert cost["breakdown"]["encoder_calls"] > 0  # CLIP-L/G still encode


def test_table_a12_drop_t5_row_reads_its_cell():
    from skrr.experiments.reference import load_table, row_cells
    from skrr.experiments.results import experiment_cells

    rows = {row.name: [c.cell.relpath().as_posix() for c in found]
            for row, found in row_cells(load_table("sd3"), experiment_cells("sd3_all_encoders"))}
    assert rows["Drop T5 (text_encoder_3=None; not in the paper)"] == ["runs/sd3/dense-drop_t5/s0.000/seed0"]
    assert rows["Dense"] == ["runs/sd3/dense/s0.000/seed0"]
