"""The offline demo behind `make demo`: every method on the tiny pipelines, offline metrics, a table and a plot.

    python scripts/demo.py [results=results/demo]

Runs `run.py -m experiment=demo` (tiny PixArt-Σ with the real all-MiniLM-L6-v2 encoder, plus sub-block
methods on a tiny random T5), then `scripts/make_table.py table=demo`, and prints where everything is.
A rerun skips every finished stage. Numbers use offline stand-in backbones: relative comparisons only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    results = Path(dict(a.split("=", 1) for a in argv if "=" in a).get("results", ROOT / "results" / "demo"))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **os.environ}
    start = time.time()
    print(f"skrr demo: searching, generating and scoring 15 cells offline on CPU -> {results}", flush=True)
    sweep = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "experiment=demo",
                            f"paths.results={results}", "hydra.verbose=false"], cwd=ROOT, env=env)
    if sweep.returncode != 0:
        print(f"error: the demo sweep failed (exit {sweep.returncode}); its log is under {results}/hydra/",
              file=sys.stderr)
        return sweep.returncode
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_table.py"), "table=demo",
                            f"results={results}"], cwd=ROOT, env=env)
    tables = results / "tables"
    md = tables / "demo.md"
    if md.exists():
        print("\n" + md.read_text())
    print(f"demo finished in {time.time() - start:.0f} s")
    print(f"  cells (plans, images, metric JSONs): {results / 'runs'}")
    print(f"  searched plans, shared by cells:     {results / 'plans'}")
    print(f"  table (md/tex/csv) and plot (png):   {tables}/demo.*")
    print(f"  W&B offline runs (wandb sync ...):   {results / 'wandb'}")
    return table.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
