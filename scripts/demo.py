"""The offline demo behind `make demo`: every method on the tiny pipelines, offline metrics, a table and a plot.

    python scripts/demo.py [results=results/demo]

Runs `run.py -m experiment=demo` (tiny PixArt-Σ with the real all-MiniLM-L6-v2 encoder, plus sub-block
methods on a tiny random T5 and a cell each on the tiny SD3, FLUX and SD2 pipelines), then `scripts/make_table.py table=demo`, and prints where everything is. It ends
with what shipping the encoder gives on the real MiniLM bytes: the Skrr 23.5 % cell exported (kept weights
only) and loaded back, alone and with int8 weights (skrr/quantize.py), against the dense encoder.
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
    from omegaconf import OmegaConf

    cells = len(OmegaConf.load(ROOT / "configs" / "experiment" / "demo.yaml").sweep.cells)
    print(f"skrr demo: searching, generating and scoring {cells} cells offline on CPU -> {results}", flush=True)
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
    cell = results / "runs" / "tiny_minilm" / "skrr" / "s0.235" / "seed0"
    if (cell / "plan.json").exists():
        print("\n" + "\n".join(shipping_report(cell, results / "exports" / "minilm-skrr")) + "\n")
    print(f"demo finished in {time.time() - start:.0f} s")
    print(f"  cells (plans, images, metric JSONs): {results / 'runs'}")
    print(f"  searched plans, shared by cells:     {results / 'plans'}")
    print(f"  table (md/tex/csv) and plot (png):   {tables}/demo.*")
    print(f"  W&B offline runs (wandb sync ...):   {results / 'wandb'}")
    print(f"  the exported Skrr MiniLM encoder:    {results / 'exports' / 'minilm-skrr'}")
    return table.returncode


def shipping_report(cell: Path, out: Path) -> list[str]:
    """Bytes and fidelity of MiniLM dense, Skrr, int8 and Skrr + int8, Skrr loaded from its exported folder.

    Fidelity: cosine similarity of each prompt's mean-pooled features to the dense fp32 encoder's, averaged
    over the 64 calibration prompts (how close the conditioning a denoiser would see stays to the dense one).
    """
    import copy

    import torch

    sys.path.insert(0, str(ROOT))
    from skrr import PruningPlan, export_pruned, load_pruned
    from skrr.calib import DEFAULT_PROMPTS, load_prompts
    from skrr.pipelines import tiny_text_encoder
    from skrr.quantize import quantize_encoder, quiet_import_notices, weight_bytes

    quiet_import_notices()

    dense, tokenizer = tiny_text_encoder("minilm")
    plan = PruningPlan.from_json(cell / "plan.json")
    export_pruned(dense, plan, out, tokenizer=tokenizer, overwrite=True,
                  info={"command": f"python scripts/demo.py  # shipping_report({cell})"})
    on_disk = (out / "skrr_pruned.safetensors").stat().st_size
    batch = tokenizer(load_prompts(DEFAULT_PROMPTS)[:64], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")

    def pooled(enc: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = enc(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    ref = pooled(dense)
    rows = [("dense", dense), ("Skrr", load_pruned(out)), ("int8", quantize_encoder(copy.deepcopy(dense), "int8")),
            ("Skrr + int8", load_pruned(out, quantize="int8"))]
    lines = [f"shipping the encoder (real all-MiniLM-L6-v2, {plan.summary()}; Skrr exported to {out}, "
             f"{on_disk / 1e6:.1f} MB on disk):",
             f"  {'encoder':<12} {'weights MB':>10} {'vs dense':>8} {'fidelity':>9}"]
    base = weight_bytes(dense)
    for name, enc in rows:
        cos = torch.nn.functional.cosine_similarity(pooled(enc), ref).mean().item()
        lines.append(f"  {name:<12} {weight_bytes(enc) / 1e6:>10.1f} {weight_bytes(enc) / base:>8.2f} {cos:>9.4f}")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
