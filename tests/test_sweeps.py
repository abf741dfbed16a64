"""Sweeps: a 2-cell multirun with submitit_local completes and a re-issue fills nothing; a run killed with
SIGKILL mid-generation resumes to the same outputs as an uninterrupted run; two processes running one cell
generate its images once."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
SAMPLES = [f"eval.{m}.prompts.samples_per_prompt=3" for m in ("fid", "clip", "dreamsim")]


def run_py(*args, results, multirun=False):
    env = {**ENV, "SKRR_CACHE": str(results / "cache")}
    flags = ["-m"] if multirun else []
    return [sys.executable, str(ROOT / "run.py"), *flags, f"paths.results={results}", "logger=none", *args], env


def test_two_cell_multirun_with_submitit_local(tmp_path):
    cmd, env = run_py("experiment=demo", "cell=0,1", "stages=[search]", "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=10", results=tmp_path, multirun=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = sorted(p.parent.parent.relative_to(tmp_path / "runs").as_posix()
                  for p in (tmp_path / "runs").rglob("stages/search.json"))
    assert done == ["tiny_minilm/dense/s0.000/seed0", "tiny_minilm/shortgpt/s0.078/seed0"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json") if p.name != "cell.json"}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # the re-issued sweep had nothing to fill


def outputs(results):
    cell = results / "runs/tiny/shortgpt/s0.300/seed0"
    plan = json.loads((cell / "plan.json").read_text())
    images = {p.name: p.read_bytes() for p in sorted((cell / "images/tiny/images").glob("*.png"))}
    metrics = {p.stem: json.loads(p.read_text())["value"] for p in (cell / "metrics").glob("*.json")}
    return plan["slots"], plan["meta"]["order"], images, metrics


def test_killed_run_resumes_to_identical_outputs(tmp_path):
    args = ["pipeline=tiny", "method=shortgpt", "sparsity=0.3", "eval=offline", *SAMPLES]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cmd, env = run_py(*args, results=clean)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)

    cmd, env = run_py(*args, results=killed)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = killed / "runs/tiny/shortgpt/s0.300/seed0/images/tiny/images"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not any(images.glob("*.png")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-generation (or, on a fast machine, a little later)
    proc.wait()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert outputs(killed) == outputs(clean)


def test_two_processes_running_one_cell_generate_its_images_once(tmp_path):
    """The generation stage is locked like the search: the second process waits and finds the images made."""
    cmd, env = run_py("pipeline=tiny", "method=dense", "sparsity=0", "eval=offline", "stages=[search,generate]",
                      *[s.replace("=3", "=1") for s in SAMPLES], results=tmp_path)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    generated = [int(n) for log in logs for n in re.findall(r"generated (\d+) images", log)]
    images = tmp_path / "runs/tiny/dense/s0.000/seed0/images/tiny/images"
    assert sum(generated) == len(list(images.glob("*.png"))) > 0, generated  # each image made by one process
    assert sum("generate: done before" in log for log in logs) == 1


def test_a_cell_composes_with_the_slurm_launcher_overrides(tmp_path, monkeypatch):
    """`+launcher=slurm` fills hydra.launcher keys only the Slurm launcher has: the cell's recomposition must
    carry `hydra/launcher=submitit_slurm` too (it failed with ConfigKeyError in every Slurm job)."""
    sys.path.insert(0, str(ROOT))
    import run

    monkeypatch.setattr(sys, "argv", ["run.py"])
    monkeypatch.setenv("SKRR_CACHE", str(tmp_path / "cache"))
    run.cli([f"paths.results={tmp_path}", "logger=none", "experiment=demo", "cell=0", "stages=[search]",
             "hydra/launcher=submitit_slurm", "+launcher=slurm"])
    assert (tmp_path / "runs/tiny_minilm/dense/s0.000/seed0/stages/search.json").exists()
