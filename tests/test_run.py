"""run.py end to end on the tiny pipeline: stages, resume, refusal of a changed config, file modes (the one-line
errors for bad input are in tests/test_bad_input.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    # Every JSON result (cell, plan, stages, metrics, the shared plan cache) is readable as the umask allows
    from skrr.io import current_umask
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*.json")}
    assert any(k.startswith("plans/") for k in modes) and any(k.endswith("/cell.json") for k in modes)
    assert set(modes.values()) == {oct(0o666 & ~current_umask())}, modes
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
