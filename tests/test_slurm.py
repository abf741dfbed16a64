"""A real Slurm (`make test-slurm`, after `sudo scripts/slurm_local.sh up`): a 2-cell sweep of the demo through
`hydra/launcher=submitit_slurm +launcher=slurm` gives the results of a local run, and a job requeued with
`scontrol requeue` mid-run (what submitit does at a time limit) resumes without redoing its finished stages."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
# Cells 0 (dense) and 1 (ShortGPT, one block) of the demo, one image per prompt: about a minute per cell.
SWEEP = ["experiment=demo", "cell=0,1", "logger=none",
         *[f"eval.{m}.prompts.samples_per_prompt=1" for m in ("fid", "clip", "dreamsim")]]
# What the one-node test cluster can give a job (configs/launcher/slurm.yaml asks for a GPU, 8 CPUs, 64 GB).
SMALL_JOBS = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
              "hydra.launcher.timeout_min=30"]
REQUEUED = "runs/tiny_minilm/shortgpt/s0.078/seed0"   # cell 1, array task 1
CELLS = ("runs/tiny_minilm/dense/s0.000/seed0", REQUEUED)


def command(results: Path, *args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "SKRR_CACHE": str(results / "cache")}
    return [sys.executable, str(ROOT / "run.py"), "-m", f"paths.results={results}", *SWEEP, *args], env


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.1)


def outputs(results: Path) -> dict:
    """Each cell's plan slots, image bytes and metric values (not timings)."""
    out = {}
    for rel in CELLS:
        cell = results / rel
        out[rel] = (json.loads((cell / "plan.json").read_text())["slots"],
                    {p.relative_to(cell).as_posix(): p.read_bytes() for p in sorted(cell.rglob("*.png"))},
                    {p.stem: json.loads(p.read_text())["value"] for p in sorted((cell / "metrics").glob("*.json"))})
    return out


@pytest.fixture(scope="module")
def slurm():
    """The cluster must be up: this test is run on purpose (`-m slurm`), so a missing Slurm is a failure."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.fail("no Slurm to test against: start one with `sudo scripts/slurm_local.sh up`")


@pytest.fixture(scope="module")
def sweep(slurm, tmp_path_factory):
    """The local run, then the Slurm sweep with cell 1's job requeued once its search stage is done."""
    tmp = tmp_path_factory.mktemp("slurm")
    local, remote = tmp / "local", tmp / "slurm"
    cmd, env = command(local)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    name = f"skrr-test-{os.getpid()}"
    cmd, env = command(remote, "hydra/launcher=submitit_slurm", "+launcher=slurm", *SMALL_JOBS,
                       f"hydra.launcher.name={name}", f"hydra.sweep.dir={remote}/sweep")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stages = remote / REQUEUED / "stages"
        wait_for(lambda: (stages / "search.json").exists() or proc.poll() is not None, 600, "cell 1's search")
        assert proc.poll() is None, proc.stdout.read()[-3000:]

        def job_of_cell_1() -> str | None:
            rows = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True).stdout
            return next((job for job, state in map(str.split, rows.splitlines())
                         if job.endswith("_1") and state == "RUNNING"), None)

        wait_for(lambda: job_of_cell_1() is not None, 60, "cell 1's job in squeue")
        job = job_of_cell_1()
        before = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
        requeued_at = time.time()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name], capture_output=True)
    assert proc.returncode == 0, out[-3000:]
    return {"local": local, "slurm": remote, "job": job, "before": before, "requeued_at": requeued_at,
            "stages": stages}


def test_slurm_sweep_gives_the_local_results(sweep):
    assert outputs(sweep["slurm"]) == outputs(sweep["local"])


def test_requeued_job_resumes_without_redoing_finished_stages(sweep):
    before, stages = sweep["before"], sweep["stages"]
    assert "search.json" in before and "score.json" not in before  # requeued mid-run, not after it finished
    show = subprocess.run(["scontrol", "show", "job", sweep["job"]], capture_output=True, text=True).stdout
    assert re.search(r"\bRestarts=1\b", show), show                   # Slurm ran the job a second time
    after = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    assert set(after) == {"search.json", "generate.json", "score.json"}
    assert {k: after[k] for k in before} == before                  # finished stages were not redone
    assert after["score.json"] / 1e9 > sweep["requeued_at"]
    logs = "".join(p.read_text() for p in (sweep["slurm"] / "sweep" / ".submitit").rglob(f"{sweep['job']}_*_log.*"))
    assert "search: done before" in logs                             # the second attempt skipped the search
