"""The bad-input battery of run.py: every case is one line on stderr naming the problem and the fix, exit 2, and
nothing left on disk (no cell.json-only folder, no plans/*.lock, no Hydra log folder).

A new case is one line in CASES: (id, overrides, a piece of the message). In the overrides, {tmp} is a folder
holding the files below, {results} the results folder. Cases run in-process through run.cli (seconds, not a
new Python per case); test_exit_code_through_a_real_process checks the same contract through `python run.py`.
"""
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402

SEARCH = ["pipeline=tiny", "stages=[search]"]
PROGRESS = re.compile(r"\d+%\|")  # tqdm bars (e.g. transformers' "Loading weights") may precede the error line
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a full tmpfs)")

CASES = [
    # configs and keys (refused before Hydra composes the run)
    ("pipeline-unknown", ["pipeline=nope"], "unknown pipeline 'nope'"),
    ("method-unknown", ["method=nope"], "unknown method 'nope'"),
    ("method-name-unknown", [*SEARCH, "method.name=nope"], "unknown method 'nope'; registered: dense, finercut"),
    ("key-unknown", [*SEARCH, "foo=1"], "unknown config key 'foo' (foo=1)"),
    ("method-key-unknown", [*SEARCH, "method.foo=1"], "method.foo: method=skrr has no setting 'foo'"),
    ("method-key-added", [*SEARCH, "+method.beam=3"], "skrr has no setting 'beam'"),
    ("nested-key-unknown", [*SEARCH, "eval=offline", "eval.fid.prompts.x=1"], "eval.fid.prompts has: name"),
    # values
    ("seed-not-int", [*SEARCH, "seed=abc"], "seed must be a whole number, got 'abc'; e.g. seed=0"),
    ("sparsity-not-number", [*SEARCH, "sparsity=abc"], "sparsity must be a number, got 'abc'"),
    ("search-sparsities-not-numbers", [*SEARCH, "search_sparsities=[0.2,x]"], "search_sparsities must be a list"),
    ("cell-not-int", ["experiment=demo", "cell=abc"], "cell must be a whole number, got 'abc'"),
    ("cell-out-of-range", ["experiment=demo", "cell=99"], "cell=99 is out of range"),
    ("sparsity-above-1", [*SEARCH, "method=dense", "sparsity=1.5"], "sparsity must be a fraction in [0, 1)"),
    ("sparsity-negative", [*SEARCH, "method=dense", "sparsity=-0.1"], "sparsity must be a fraction in [0, 1)"),
    ("dense-with-sparsity", [*SEARCH, "method=dense", "sparsity=0.3"], "method=dense prunes nothing"),
    ("beam-width-zero", [*SEARCH, "method.beam_width=0"], "method: beam_width must be >= 1, got 0"),
    ("beam-width-fraction", [*SEARCH, "method.beam_width=2.5"], "method.beam_width must be a whole number, got 2.5"),
    ("state-cache-negative", [*SEARCH, "method.state_cache_gib=-1"], "method: state_cache_gib must be >= 0"),
    ("laco-merge-layers", [*SEARCH, "method=laco", "method.merge_layers=1"], "laco.merge_layers (C) must be >= 2"),
    pytest.param("cuda-without-gpu", [*SEARCH, "device=cuda"], "device=cuda but this machine has no usable CUDA GPU",
                 marks=NO_GPU, id="cuda-without-gpu"),
    pytest.param("nf4-without-gpu", [*SEARCH, "quantize=nf4"], "quantize=nf4 runs on CUDA only", marks=NO_GPU,
                 id="nf4-without-gpu"),
    ("quantize-unknown", [*SEARCH, "quantize=int4"], "unknown quantize='int4'; choose one of none, int8"),
    ("drop-t5-not-sd3", [*SEARCH, "method=dense", "sparsity=0", "drop_text_encoder=true"], "is for SD3"),
    ("drop-t5-pruned", ["pipeline=tiny_sd3", "stages=[search]", "drop_text_encoder=true"], "use method=dense sparsity=0"),
    ("encoders-not-sd3", [*SEARCH, "encoders.clip_l=0.3"], "pipeline=tiny has one text encoder to prune"),
    ("encoders-method", ["pipeline=tiny_sd3", "stages=[search]", "method=shortgpt", "sparsity=0.2",
                         "encoders.clip_l=0.3"], "is a Skrr search; use method=skrr"),
    ("encoders-t5-mismatch", ["pipeline=tiny_sd3", "stages=[search]", "encoders.t5=0.2"], "contradicts sparsity=0.419"),
    ("encoders-above-1", ["pipeline=tiny_sd3", "stages=[search]", "encoders.clip_g=1.5"],
     "encoders.clip_g must be a sparsity in [0, 1)"),
    ("encoders-unknown", ["pipeline=tiny_sd3", "stages=[search]", "encoders={{clip_x: 0.3}}"],
     "unknown config key 'encoders.clip_x'"),
    ("sd3-clip-rounds", ["pipeline=tiny_sd3", "stages=[search]", "encoders.clip_l=0.3", "sd3_clip.max_rounds=0"],
     "sd3_clip.max_rounds must be a whole number >= 1"),
    # calibration prompts
    ("prompts-missing", [*SEARCH, "method=shortgpt", "calib.prompts={tmp}/no.txt"], "does not exist"),
    ("prompts-folder", [*SEARCH, "method=shortgpt", "calib.prompts={tmp}"], "is a folder; give a file"),
    ("prompts-binary", [*SEARCH, "method=shortgpt", "calib.prompts={tmp}/binary.txt"], "binary.txt is not UTF-8"),
    ("prompts-one", [*SEARCH, "method=shortgpt", "calib.prompts={tmp}/one.txt"], "one calibration prompt"),
    ("num-calib-one", [*SEARCH, "method=shortgpt", "calib.num_calib_prompts=1"], "calib.num_calib_prompts=1)"),
    ("prompts-fewer-than-asked", [*SEARCH, "method=shortgpt", "calib.prompts={tmp}/three.txt",
                                  "calib.num_calib_prompts=10"], "holds 3 prompts; set calib.num_calib_prompts=3"),
    # models, plans and the files a later stage reads (checked before the first stage)
    ("model-folder-empty", ["pipeline=pixart_sigma", "stages=[search]", "pipeline.model_id={tmp}/model"],
     "is an empty folder, not a diffusers pipeline folder"),
    ("model-not-cached", ["pipeline=pixart_sigma", "method=shortgpt", "stages=[search]"], "HF_HUB_OFFLINE=1"),
    ("plan-file-missing", [*SEARCH, "method=dense", "sparsity=0", "plan_file={tmp}/no.json"], "is not a file"),
    ("plan-other-encoder", [*SEARCH, "method=dense", "sparsity=0", "plan_file={tmp}/other_plan.json"],
     "does not fit pipeline=tiny, whose encoder is"),
    ("coco-missing", ["pipeline=tiny", "method=shortgpt", "eval=clip", "paths.data={tmp}/data"],
     "set eval.clip.prompts.path"),
    ("geneval-missing", ["pipeline=tiny", "method=shortgpt", "eval=geneval", "paths.data={tmp}/data"],
     "set eval.geneval.prompts.path"),
    ("fid-legacy-mode", [*SEARCH, "eval=offline", "eval.fid.mode=legacy_pytorch"],
     "eval.fid.mode='legacy_pytorch' is not supported"),
    ("sub-blocks-of-post-ln", ["pipeline=tiny_minilm", "method=finercut", "sparsity=0.2", "stages=[search]"],
     "post-LN"),
    # the results folder and the launcher
    ("results-under-a-file", [*SEARCH, "paths.results={tmp}/file/results"], "which is a file, not a folder"),
    ("results-read-only", [*SEARCH, "paths.results={tmp}/readonly"], "cannot write under paths.results="),
    pytest.param("results-disk-full", [*SEARCH, "paths.results={tmp}/full"], "no space left under paths.results",
                 marks=ROOT_ONLY, id="results-disk-full"),
    ("no-slurm", ["-m", "experiment=demo", "hydra/launcher=submitit_slurm", "+launcher=slurm"], "no Slurm here"),
]


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """The files the cases point at, a results folder, and the special folders some cases need."""
    tmp = tmp_path / "in"
    tmp.mkdir()
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp / "one.txt").write_text("a cat on a sofa\n")
    (tmp / "three.txt").write_text("a cat\na dog\na bird\n")
    (tmp / "file").write_text("not a folder\n")
    (tmp / "model").mkdir()
    from skrr import identity_plan
    from skrr.tiny import tiny_t5

    identity_plan(tiny_t5(num_layers=3)).with_slots({0: None}).to_json(tmp / "other_plan.json")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setenv("SKRR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["run.py"])  # run.cli sets it for Hydra
    return tmp, results


def special_folder(case: str, tmp: Path, monkeypatch) -> list[list[str]]:
    """Read-only (for root: immutable, or a read-only bind mount; else mode 0555), full (a 64 KiB tmpfs, filled),
    or no Slurm on PATH. Returns the commands that undo it."""
    if case == "results-read-only":
        ro = tmp / "readonly"
        ro.mkdir()
        if os.geteuid() != 0:
            ro.chmod(0o555)
            return []
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0:
            return [["chattr", "-i", str(ro)]]
        # A file system without chattr (overlayfs): a read-only bind mount of the folder onto itself
        subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        return [["umount", str(ro)]]
    if case == "results-disk-full":
        full = tmp / "full"
        full.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
        try:
            with open(full / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        return [["umount", str(full)]]
    if case == "no-slurm":
        bare = tmp / "bin"
        bare.mkdir()
        monkeypatch.setenv("PATH", str(bare))
    return []


@pytest.mark.parametrize("case, overrides, message", [c if hasattr(c, "values") else pytest.param(*c, id=c[0])
                                                      for c in CASES])
def test_bad_input(case, overrides, message, inputs, capfd, monkeypatch):
    tmp, results = inputs
    undo = special_folder(case, tmp, monkeypatch)
    before = files_under(tmp.parent)
    args = [f"paths.results={results}", "logger=none", *(o.format(tmp=tmp, results=results) for o in overrides)]
    try:
        with pytest.raises(SystemExit) as exit_:
            run.cli(args)
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip() and not PROGRESS.search(line)]
        after = files_under(tmp.parent)
    finally:
        for command in undo:
            subprocess.run(command, check=True)
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert after == before, sorted(after - before)  # nothing left on disk


def test_exit_code_through_a_real_process(tmp_path):
    """The same contract through `python run.py` (exit status, stderr, folders) for a case failing mid-search."""
    other = tmp_path / "other_plan.json"
    from skrr import identity_plan
    from skrr.tiny import tiny_t5

    identity_plan(tiny_t5(num_layers=3)).with_slots({0: None}).to_json(other)
    (tmp_path / "results").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SKRR_CACHE": str(tmp_path / "cache")}
    before = files_under(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path / 'results'}",
                           "logger=none", *SEARCH, "method=dense", "sparsity=0", f"plan_file={other}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert files_under(tmp_path) == before
