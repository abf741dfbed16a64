"""Dispatch for run.py: generate the prompt sets the selected metrics need, then write one JSON per metric.

``cfg.eval`` maps a metric key (fid, clip, dreamsim, geneval, cost, clip1k, ...) to a node with ``metric``
(which scorer), ``prompts`` (a prompt-set spec, see ``eval.prompts.load_prompt_set``) and a ``backbone``
(or ``detector`` + ``color``) built with ``hydra.utils.instantiate(..., device=...)``. Layout:

    <images_root>/<prompt set name>/...       one generation folder per prompt set (eval.generate)
    <out_dir>/<metric key>.json               one result per metric; an existing file is not recomputed

Every JSON: metric, kind, value (+ per_task for GenEval), n_images, backbone, mode, prompt_set, target and
realized sparsity, the caller's info, package versions, elapsed seconds.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eval import EvalError
from eval.generate import GenerationResult, GenerationSettings, generate_images
from eval.prompts import load_prompt_set
from skrr.io import atomic_write_json

log = logging.getLogger(__name__)

KINDS = ("fid", "clip", "dreamsim", "geneval", "cost")
PACKAGES = ("torch", "transformers", "diffusers", "clean-fid", "open_clip_torch", "dreamsim", "numpy", "scipy",
            "pillow")


@dataclass
class ScoreContext:
    """What scoring needs besides images: device, sparsities to record, the pipeline (cost), caller info."""

    device: str = "cpu"
    target_sparsity: float | None = None
    realized_sparsity: float | None = None
    pipeline: Any = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    info: dict[str, Any] = field(default_factory=dict)


def _plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain-dict copy of a config node (DictConfig or mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # omegaconf is a pinned dependency; plain dicts work without it
        pass
    return json.loads(json.dumps(dict(cfg or {})))


def settings_from_config(generation: Mapping[str, Any], call_kwargs: Mapping[str, Any] | None = None,
                         seed: int = 0) -> GenerationSettings:
    """GenerationSettings from a pipeline config's ``generation`` and ``call_kwargs`` nodes and the image seed."""
    g = _plain(generation)
    allowed = set(GenerationSettings.__dataclass_fields__) - {"call_kwargs", "seed"}
    unknown = set(g) - allowed
    if unknown:
        raise EvalError(f"unknown generation settings {sorted(unknown)}; use {sorted(allowed)}")
    return GenerationSettings(**g, seed=int(seed), call_kwargs=_plain(call_kwargs or {}))


def metric_specs(cfg_eval: Any) -> dict[str, dict[str, Any]]:
    """The selected metrics as plain dicts, each checked to name a known scorer (and FID a supported mode)."""
    specs = _plain(cfg_eval)
    for key, spec in specs.items():
        kind = spec.get("metric") if isinstance(spec, dict) else None
        if kind not in KINDS:
            raise EvalError(f"eval.{key} has metric={kind!r}; use one of {list(KINDS)} (configs/eval/)")
        if kind == "fid":
            from eval.fid import MODE, check_mode

            check_mode(spec.get("mode", MODE), key=f"eval.{key}.mode")
    return specs


def prompt_set_name(key: str, spec: Mapping[str, Any]) -> str:
    """The prompt set (and image folder) of metric ``key``: ``prompts.name``, else the key itself."""
    return spec.get("prompts", {}).get("name") or key


def prompt_sets(cfg_eval: Any) -> dict[str, dict[str, Any]]:
    """Prompt-set specs the selected metrics need, by name; metrics sharing a name must agree on it."""
    sets: dict[str, dict[str, Any]] = {}
    first: dict[str, str] = {}  # set name -> the first metric key that uses it (named in errors)
    for key, spec in metric_specs(cfg_eval).items():
        if "prompts" not in spec:
            continue
        ps = spec["prompts"]
        name = prompt_set_name(key, spec)
        if name in sets and sets[name] != ps:
            raise EvalError(f"prompt set {name!r} is defined differently by eval.{first[name]} and eval.{key}; "
                            f"make them equal or give one another prompts.name")
        sets[name] = ps
        first.setdefault(name, key)
    return {name: {**ps, "name": name, "config_key": f"eval.{first[name]}.prompts.path"} for name, ps in sets.items()}


def generate_all(cfg_eval: Any, pipeline: Any, images_root: str | Path, settings: GenerationSettings,
                 device: str | None = None, extra: Mapping[str, Any] | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict[str, GenerationResult]:
    """Generate (only the missing) images of every prompt set the selected metrics need."""
    results = {}
    for name, spec in prompt_sets(cfg_eval).items():
        prompts = load_prompt_set(spec, key=spec["config_key"])
        s = GenerationSettings(**{**asdict(settings), "samples_per_prompt": int(spec.get("samples_per_prompt", 1))})
        results[name] = generate_images(pipeline, prompts, Path(images_root) / name, s, device=device,
                                        extra=extra, overwrite=overwrite, progress=progress)
    return results


def versions() -> dict[str, str]:
    """Installed versions of the packages that can move a metric."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _build(node: dict[str, Any], device: str) -> Any:
    from hydra.utils import instantiate

    return instantiate(node, device=device)


def score_one(key: str, spec: dict[str, Any], images_root: Path, dense_root: Path | None,
              context: ScoreContext) -> dict[str, Any]:
    """Compute one metric; returns the fields of its JSON that depend on the metric."""
    kind = spec["metric"]
    name = prompt_set_name(key, spec)
    images = images_root / name
    if kind == "cost":
        from eval.efficiency import measure_cost

        if context.pipeline is None:
            raise EvalError("the cost metric needs the pipeline; pass ScoreContext(pipeline=...)")
        r = measure_cost(context.pipeline, context.settings, prompt=spec.get("prompt", "a photo of a cat"),
                         device=None, probe_steps=int(spec.get("probe_steps", 2)))
        return {"value": r.tflops, "params_b": r.params_b, "memory_gib": r.memory_gib, "memory_kind": r.memory_kind,
                "tflops": r.tflops, "params": r.params, "weights_gib_bf16": r.weights_gib_bf16,
                "peak_gib": r.peak_gib, "peak_kind": r.peak_kind, "flops_device": r.flops_device,
                "flops_method": r.flops_method, "breakdown": r.flops_breakdown, "quantize": r.quantize, "n_images": 1,
                "backbone": f"torch.utils.flop_counter on {r.flops_device} (fused attention counted)"}
    if kind == "fid":
        from eval.fid import fid_dir

        ref = spec.get("ref_dir")
        if ref == "dense":
            if dense_root is None:
                raise EvalError(f"eval.{key}.ref_dir=dense needs the dense run's images; pass dense_images_root")
            ref = dense_root / name / "images"
        extractor = _build(spec["backbone"], context.device)
        r = fid_dir(extractor, images, ref, mode=spec.get("mode", "clean"), device=context.device,
                    batch_size=int(spec.get("batch_size", 32)), cache_dir=spec.get("cache_dir"),
                    num_workers=int(spec.get("num_workers", 0)))
        return {"value": r.value, "n_images": r.n_images, "n_ref": r.n_ref, "backbone": r.backbone, "mode": r.mode,
                "reference": str(ref), "ref_stats": r.ref_stats}
    if kind == "clip":
        from eval.clip_score import clip_score_dir

        r = clip_score_dir(_build(spec["backbone"], context.device), images, int(spec.get("batch_size", 32)))
        return {"value": r.value, "std": r.std, "n_images": r.n_images, "backbone": r.backbone,
                "mode": "raw cosine (not x100, no clamp)"}
    if kind == "dreamsim":
        from eval.dreamsim import dreamsim_dir

        if dense_root is None:
            raise EvalError(f"eval.{key} compares to the dense run; pass dense_images_root")
        r = dreamsim_dir(_build(spec["backbone"], context.device), images, dense_root / name,
                         int(spec.get("batch_size", 16)))
        return {"value": r.value, "n_images": r.n_images, "backbone": r.backbone, "n_identical": r.n_identical,
                "mode": "1 - distance(dense, this run)", "dense_images": str(dense_root / name)}
    from eval.geneval import geneval_dir  # kind == "geneval"

    detector = _build(spec["detector"], context.device)
    color = _build(spec["color"], context.device)
    r = geneval_dir(detector, color, images)
    return {"value": r.overall, "per_task": r.per_task, "n_images": r.n_images, "backbone": r.backbone,
            "mode": "official rules, transformers Mask2Former (see eval/geneval.py)", "details": r.details}


def score_all(cfg_eval: Any, images_root: str | Path, dense_images_root: str | Path | None, out_dir: str | Path,
              context: ScoreContext, overwrite: bool = False) -> dict[str, Path]:
    """Score every selected metric into ``out_dir/<key>.json`` (existing files are kept); returns key -> path."""
    images_root, out_dir = Path(images_root), Path(out_dir)
    dense_root = Path(dense_images_root) if dense_images_root is not None else None
    paths = {}
    for key, spec in metric_specs(cfg_eval).items():
        path = out_dir / f"{key}.json"
        paths[key] = path
        if path.is_file() and not overwrite:
            log.info("%s exists; skipping", path)
            continue
        start = time.perf_counter()
        fields = score_one(key, spec, images_root, dense_root, context)
        gen = images_root / prompt_set_name(key, spec) / "generation.json"
        record = {"metric": key, "kind": spec["metric"], **fields,
                  "prompt_set": json.loads(gen.read_text())["prompt_set"] if gen.is_file() else None,
                  "target_sparsity": context.target_sparsity, "realized_sparsity": context.realized_sparsity,
                  "info": dict(context.info), "versions": versions(),
                  "elapsed_s": round(time.perf_counter() - start, 3)}
        atomic_write_json(path, record)
        log.info("%s = %.4f (%s) -> %s", key, record["value"], record["backbone"], path)
    return paths
