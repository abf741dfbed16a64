"""run.py end to end on the tiny pipeline: stages, resume, refusal of a changed config, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*overrides, results, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SKRR_CACHE": str(results / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"paths.results={results}", "logger=none",
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tiny_cell_runs_end_to_end_and_resumes(tmp_path):
    cell = tmp_path / "runs/tiny/shortgpt/s0.300/seed0"
    run("pipeline=tiny", "method=shortgpt", "sparsity=0.3", "eval=offline", "eval.fid.prompts.samples_per_prompt=1",
        "eval.clip.prompts.samples_per_prompt=1", "eval.dreamsim.prompts.samples_per_prompt=1", results=tmp_path)
    plan = json.loads((cell / "plan.json").read_text())
    assert plan["meta"]["realized_sparsity"] >= 0.3 - 5e-4
    metrics = {p.stem: json.loads(p.read_text()) for p in (cell / "metrics").glob("*.json")}
    assert set(metrics) == {"fid", "clip", "dreamsim", "cost"}
    assert "NOT" in metrics["fid"]["backbone"]  # offline stand-ins are labelled as such
    assert (tmp_path / "runs/tiny/dense/s0.000/seed0/images/tiny/manifest.jsonl").exists()  # paired dense images
    stamps = {p: p.stat().st_mtime_ns for p in cell.rglob("*") if p.is_file() and p.name != "cell.json"}
    again = run("pipeline=tiny", "method=shortgpt", "sparsity=0.3", "eval=offline",
                "eval.fid.prompts.samples_per_prompt=1", "eval.clip.prompts.samples_per_prompt=1",
                "eval.dreamsim.prompts.samples_per_prompt=1", results=tmp_path)
    assert "search: done before" in again.stdout and "generate: done before" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing rewritten
    # The same folder with another config is refused, in one line, unless overwrite=true
    refused = run("pipeline=tiny", "method=shortgpt", "sparsity=0.3", "calib.num_calib_prompts=8", "stages=[search]",
                  results=tmp_path, check=False)
    assert refused.returncode == 2 and "overwrite=true" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    run("pipeline=tiny", "method=shortgpt", "sparsity=0.3", "calib.num_calib_prompts=8", "stages=[search]",
        "overwrite=true", results=tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["pipeline=nope"], "unknown pipeline 'nope'"),
    (["method=nope"], "unknown method 'nope'"),
    (["pipeline=tiny", "method=dense", "sparsity=1.5"], "sparsity must be a fraction in [0, 1)"),
    (["pipeline=tiny", "method=dense", "sparsity=-0.1"], "sparsity must be a fraction in [0, 1)"),
    (["pipeline=tiny", "method=dense", "sparsity=0.3"], "method=dense prunes nothing"),
    (["pipeline=tiny", "method=dense", "sparsity=0", "calib.prompts=/no/such/file.txt", "method=shortgpt",
      "sparsity=0.3"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    proc = run(*overrides, "stages=[search]", results=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("plan.json"))


@pytest.mark.parametrize("overrides, message", [
    (["method.beam_width=0"], "method: beam_width must be >= 1, got 0"),
    (["method.state_cache_gib=-1"], "method: state_cache_gib must be >= 0"),
    (["method=laco", "method.merge_layers=1"], "method: laco.merge_layers (C) must be >= 2"),
    (["+method.beam=3"], "method.beam: skrr has no setting 'beam'"),
    (["method.name=nope"], "unknown method 'nope'; registered: dense, finercut, laco, magnitude, shortgpt, skrr, wanda"),
    (["eval=offline", "eval.fid.mode=legacy_pytorch"], "eval.fid.mode='legacy_pytorch' is not supported"),
])
def test_bad_method_settings_are_one_line_and_write_nothing(tmp_path, overrides, message):
    proc = run("pipeline=tiny", *overrides, "stages=[search]", results=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "runs").exists()  # refused before the cell folder is made


def test_plan_for_another_encoder_is_refused(tmp_path):
    from skrr import identity_plan
    from skrr.tiny import tiny_t5

    other = tmp_path / "other.json"
    identity_plan(tiny_t5(num_layers=3)).with_slots({0: None}).to_json(other)
    proc = run("pipeline=tiny", "method=dense", "sparsity=0", f"plan_file={other}", "stages=[search]",
               results=tmp_path, check=False)
    assert proc.returncode == 2 and "made for" in proc.stderr
    assert not any((tmp_path / "runs").rglob("plan.json"))
