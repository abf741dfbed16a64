"""Export a pruned text encoder as a self-contained folder (kept weights only), optionally push it to the hub.

    python scripts/export.py --cell results/runs/tiny/skrr-t5/s0.200/seed0 --out exports/tiny-skrr
    python scripts/export.py --cell results/runs/sd3/skrr-all_encoders/s0.419/seed0 --encoder clip_l --out exports/sd3-clip-l
    python scripts/export.py --plan plan.json --model-id PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
        --kind pixart_sigma --dtype bfloat16 --out exports/pixart-skrr [--push-to-hub USER/NAME]

From a cell folder, the cell's pipeline (cell.json), plan.json and metrics/ are used; from a plan, the dense
encoder of ``--model-id`` (hub id or local folder; ``--kind`` picks the pipeline's T5 subfolder, or give
``--subfolder``). Only the kept tensors of the dense checkpoint are read. The folder drops into a diffusers
pipeline folder as its text-encoder component (``--kind`` prints which: text_encoder, text_encoder_3 for SD3,
text_encoder_2 for FLUX; with ``--encoder clip_l|clip_g``, SD3's text_encoder / text_encoder_2 of a cell run
with ``encoders=``, from its plan_<encoder>.json). Bad input: one line on stderr, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing skrr

log = logging.getLogger("skrr.export")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cell", type=Path, help="a cell folder of run.py (cell.json, plan.json, metrics/)")
    src.add_argument("--plan", type=Path, help="a plan.json (with --model-id)")
    p.add_argument("--model-id", help="dense checkpoint: hub id or local folder (with --plan)")
    p.add_argument("--kind", choices=["pixart_sigma", "sd3", "flux"], help="pipeline layout of --model-id")
    p.add_argument("--encoder", choices=["t5", "clip_l", "clip_g"], default="t5",
                   help="which text encoder: the pipeline's T5 (default) or SD3's CLIP-L / CLIP-G (encoders= cells)")
    p.add_argument("--subfolder", help="folder of the encoder inside --model-id (default: from --kind, else '')")
    p.add_argument("--tokenizer-subfolder", help="folder of the tokenizer (default: from --kind, else --subfolder)")
    p.add_argument("--revision", help="hub revision of --model-id")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the kept weights (default: "
                   "as stored, or the cell's pipeline dtype)")
    p.add_argument("--quantize", choices=["none", "int8", "fp8", "nf4"], default="none",
                   help="weight-only quantization that load_pruned applies (skrr/quantize.py; nf4 CUDA only)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this hub model repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    args = p.parse_args(argv)
    if args.plan is not None and not args.model_id:
        p.error("--plan needs --model-id (the dense checkpoint the plan was searched on)")
    if args.cell is not None and (args.model_id or args.kind):
        p.error("--cell takes the pipeline from the cell's config; drop --model-id/--kind")
    return args


def from_cell(cell: Path, dtype: str | None, which: str = "t5") -> tuple[Any, Any, Any, dict[str, Any]]:
    """(pruned encoder, tokenizer, plan, card info) of a run.py cell folder (``which``: SD3's clip_l / clip_g)."""
    from skrr.experiments.store import read_json
    from skrr.export import ExportError
    from skrr.pipelines import PipelineSpec, load_pruned_text_encoder
    from skrr.plan import PruningPlan

    plan_file = "plan.json" if which == "t5" else f"plan_{which}.json"
    if not (cell / "cell.json").exists() or not (cell / "plan.json").exists():
        raise ExportError(f"{cell} is not a finished cell folder (needs cell.json and plan.json); run its search "
                          f"stage first or pass --plan and --model-id")
    if not (cell / plan_file).exists():
        raise ExportError(f"{cell} has no {plan_file}: the cell did not prune {which}; run it with "
                          f"encoders.{which}=<sparsity> or export --encoder t5")
    record = read_json(cell / "cell.json")
    pipeline = dict(record["config"]["pipeline"])
    if dtype:
        pipeline["dtype"] = dtype
    spec = PipelineSpec.from_config(pipeline)
    plan = PruningPlan.from_json(cell / plan_file)
    encoder, tokenizer = load_pruned_text_encoder(spec, plan, "cpu", which)
    metrics = {}
    for f in sorted((cell / "metrics").glob("*.json")):
        value = read_json(f).get("value")
        if value is not None:
            metrics[f.stem] = value
    c = record["cell"]
    run = (f"python run.py pipeline={c['pipeline']} method={c['method']} sparsity={c['sparsity']} "
           f"seed={c['seed']}" + (f" tag={c['tag']}" if c.get("tag") else "") + f"  # config signature "
           f"{record.get('signature')}, experiment {record.get('experiment')}")
    return encoder, tokenizer, plan, {"metrics": metrics, "run": run, "component": spec.component(which)[0]}


def from_plan(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(pruned encoder, tokenizer, plan, card info) of a plan file and a dense checkpoint."""
    from transformers import AutoTokenizer

    from skrr.export import ExportError, load_pruned_from_dense
    from skrr.pipelines import PipelineSpec
    from skrr.plan import PruningPlan

    plan = PruningPlan.from_json(args.plan)
    if args.kind:
        try:
            component, tokenizer_name, cls_name = PipelineSpec(args.kind, args.kind).component(args.encoder)
        except ValueError as err:
            raise ExportError(f"--encoder {args.encoder}: {err}") from err
    else:  # a bare checkpoint: the plan's family says which class
        component, tokenizer_name = "", ""
        cls_name = {"t5": "T5EncoderModel", "clip": "CLIPTextModel", "bert": "BertModel"}[plan.encoder.family]
    sub = args.subfolder if args.subfolder is not None else component
    tok_sub = args.tokenizer_subfolder if args.tokenizer_subfolder is not None else (tokenizer_name or sub)
    encoder = load_pruned_from_dense(args.model_id, plan, args.dtype, "cpu", sub, args.revision, cls_name=cls_name)
    tokenizer = AutoTokenizer.from_pretrained(args.model_id, subfolder=tok_sub, revision=args.revision)
    return encoder, tokenizer, plan, {"component": component or "text_encoder"}


def main(argv: list[str]) -> int:
    """Export (and push); return the exit code."""
    args = parse(argv)
    from skrr.export import ExportError, export_pruned, push_to_hub
    from skrr.experiments.store import StoreError
    from skrr.pipelines import ModelUnavailableError
    from skrr.plan import PlanError
    from skrr.quantize import QuantizeError
    from skrr.tensorfile import TensorFileError

    try:
        encoder, tokenizer, plan, info = (from_cell(args.cell, args.dtype, args.encoder) if args.cell
                                          else from_plan(args))
        info["command"] = shlex.join(["python", "scripts/export.py", *argv])
        if info.get("run"):
            info["command"] = info.pop("run") + "\n" + info["command"]
        out = export_pruned(encoder, None, args.out, tokenizer=tokenizer, info=info, overwrite=args.overwrite,
                            quantize=args.quantize)
        manifest = json.loads((out / "skrr_pruned.json").read_text())
        print(f"{out}: {manifest['summary']}; {manifest['params']:,} params of {manifest['dense_params']:,}, "
              f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['dtype']}); in a diffusers pipeline folder it is "
              f"the {info['component']}/ component")
        if args.push_to_hub:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, private=args.private)}")
    except (ExportError, PlanError, QuantizeError, StoreError, ModelUnavailableError, TensorFileError,
            OSError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
