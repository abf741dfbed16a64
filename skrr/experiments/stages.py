"""The stages of a cell (search -> generate -> score), each skipped when its output is already on disk."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from skrr.interface import PruningMethod
from skrr.io import atomic_write_json, atomic_write_text
from skrr.pipelines import (PipelineSpec, denoiser_of, load_pipeline, load_pruned_text_encoder, load_text_encoder,
                            set_text_encoder, text_encoder_of)
from skrr.plan import PlanError, PruningPlan
from skrr.surgery import signature
from skrr.experiments.search import search_plans
from skrr.experiments.store import Cell, CellStore
from skrr.experiments.tracking import Tracker

log = logging.getLogger(__name__)

# Metrics that compare a run with the dense run of the same pipeline and seed (paired images).
DENSE_METRICS = ("dreamsim",)


class InputError(ValueError):
    """An input a cell needs that is missing or unusable, found before its first stage (one line, exit 2)."""


def check_inputs(cfg: DictConfig, store: CellStore, method: PruningMethod, spec: PipelineSpec) -> None:
    """Every file and folder the cell's remaining stages will read, checked before the first one runs.

    A missing COCO captions file found after a search of 3-5 GPU-hours (SPEC §2) is hours lost; here it is a
    one-line error before anything is written.
    """
    _check_model_folder(spec)
    if not store.done("search"):
        if cfg.plan_file:
            if not Path(cfg.plan_file).is_file():
                raise InputError(f"plan_file={cfg.plan_file} is not a file; give a plan JSON (e.g. a cell's plan.json)"
                                 f" or drop plan_file to search")
        elif method.needs_calibration:
            _check_calibration(cfg)
    if cfg.eval and ("generate" in cfg.stages or "score" in cfg.stages):
        _check_eval_inputs(cfg, store)


def _check_model_folder(spec: PipelineSpec) -> None:
    if spec.kind == "tiny" or not spec.model_id or not Path(spec.model_id).expanduser().exists():
        return  # a hub id: the loader names a missing or gated download itself
    folder = Path(spec.model_id).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "a file" if folder.is_file() else ("an empty folder" if not any(folder.iterdir()) else
                                                   "a folder without model_index.json")
        raise InputError(f"pipeline.model_id={spec.model_id} is {what}, not a diffusers pipeline folder; point it at "
                         f"a full download (huggingface-cli download <hub id> --local-dir <folder>) or use the hub id")


def _check_calibration(cfg: DictConfig) -> None:
    from skrr.calib import DEFAULT_PROMPTS, load_prompts

    c = cfg.calib
    path = Path(c.prompts).expanduser() if c.prompts else DEFAULT_PROMPTS
    if path.is_dir():
        raise InputError(f"calib.prompts={c.prompts} is a folder; give a file (.txt one prompt per line, .jsonl or "
                         f".csv)")
    try:
        prompts = load_prompts(path, c.column)
    except UnicodeDecodeError as err:
        raise InputError(f"calib.prompts={path} is not UTF-8 text (byte {err.start}: a binary file?); give a .txt "
                         f"(one prompt per line), .jsonl or .csv file") from err
    asked = c.num_calib_prompts
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int)):
        raise InputError(f"calib.num_calib_prompts must be a whole number, got {asked!r}; e.g. "
                         f"calib.num_calib_prompts=1000")
    if min(len(prompts), asked or len(prompts)) < 2:
        source = f"{path} holds one prompt" if len(prompts) < 2 else f"calib.num_calib_prompts={asked}"
        raise InputError(f"one calibration prompt ({source}) cannot rank layers: every score would be one caption's; "
                         f"use at least 2 (the paper used 1,000 captions)")
    if asked is not None and asked > len(prompts):
        if c.prompts:
            raise InputError(f"calib.num_calib_prompts={asked} but {path} holds {len(prompts)} prompts; set "
                             f"calib.num_calib_prompts={len(prompts)} or give a file with {asked} prompts")
        # The shipped file (64 prompts) with the paper's 1,000: runs (the tests and the demo do), but says so.
        log.warning("calibration: calib.num_calib_prompts=%s but the shipped %s holds %d prompts, all used; the "
                    "paper used 1,000 CC12M captions (set calib.prompts=<file>)", asked, path.name, len(prompts))


def _check_eval_inputs(cfg: DictConfig, store: CellStore) -> None:
    from eval.prompts import load_prompt_set
    from eval.score import metric_specs, prompt_sets

    if "generate" in cfg.stages and not store.done("generate"):
        for spec in prompt_sets(cfg.eval).values():
            load_prompt_set(spec, key=spec["config_key"])  # a missing COCO/GenEval file: one line naming its key
    if "score" in cfg.stages:
        for key, spec in metric_specs(cfg.eval).items():
            ref = spec.get("ref_dir")
            if ref and ref != "dense" and not store.metric_path(key).exists() and not Path(ref).is_dir():
                raise InputError(f"eval.{key}.ref_dir={ref} is not a folder; prepare the reference images with "
                                 f"scripts/prepare_refs.py, or set eval.{key}.ref_dir=dense")


def tracker_for(cfg: DictConfig, store: CellStore) -> Tracker:
    """The W&B mirror of a cell (a no-op with logger.enabled=false)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return Tracker(cfg.logger, store.cell, store.signature, cfg.experiment, config, store.results)


def given_encoders(cfg: DictConfig) -> dict[str, Any]:
    """The ``encoders=`` entries a cell sets (null = not set), as given: what enters its signature."""
    given = cfg.get("encoders")
    if given is not None and not OmegaConf.is_dict(given):
        raise InputError(f"encoders must map encoder names to sparsities, got {given!r}; e.g. "
                         f"\"encoders={{clip_l: 0.306, clip_g: 0.303}}\"")
    entries = OmegaConf.to_container(given, resolve=True) if given is not None else {}
    return {k: v for k, v in entries.items() if v is not None}


def extra_encoders(cfg: DictConfig, spec: PipelineSpec, method_name: str) -> dict[str, float]:
    """The cell's other text encoders to prune (``encoders=``, SD3's CLIP-L/G, paper Table A12): name -> target
    sparsity, checked (one line naming the key otherwise). The T5's target is always ``sparsity``."""
    from skrr.pipelines import MAIN

    given = given_encoders(cfg)
    if not given:
        return {}
    names = spec.encoder_names()
    if len(names) == 1:
        raise InputError(f"encoders= prunes SD3's CLIP encoders; pipeline={spec.name} has one text encoder to prune, "
                         f"set by sparsity=; drop encoders=")
    extra = {}
    for name, value in given.items():
        if name not in names:
            raise InputError(f"encoders.{name}: pipeline {spec.name} has no text encoder {name!r}; choose from "
                             f"{', '.join(names)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InputError(f"encoders.{name} must be a sparsity in [0, 1) (e.g. 0.306 for 30.6 %), got {value!r}")
        target = round(float(value), 6)
        if name == MAIN:
            if target != round(float(cfg.sparsity), 6):
                raise InputError(f"encoders.{MAIN}={value} contradicts sparsity={cfg.sparsity} (the cell's T5 target); "
                                 f"set sparsity={value} or drop encoders.{MAIN}")
            continue
        if target > 0:
            extra[name] = target
    if extra and method_name != "skrr":
        raise InputError(f"encoders= (SD3's CLIP encoders scored on what the denoiser receives from them) is a Skrr "
                         f"search; use method=skrr, or drop encoders= to prune the T5 only with method={method_name}")
    if extra:
        clip_rounds(cfg)  # a bad sd3_clip.max_rounds: one line now, not after the T5's search
    return extra


def clip_rounds(cfg: DictConfig) -> int | None:
    """``sd3_clip.max_rounds``, checked: Skip rounds of the CLIP searches (None: the method's own rule)."""
    rounds = cfg.sd3_clip.get("max_rounds")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise InputError(f"sd3_clip.max_rounds must be a whole number >= 1 (or null for half the units), got "
                         f"{rounds!r}; e.g. sd3_clip.max_rounds=12")
    return rounds


def clip_method(cfg: DictConfig, method: PruningMethod) -> PruningMethod:
    """The method that searches SD3's CLIPs: the cell's, with ``sd3_clip.max_rounds`` when it is set."""
    rounds = clip_rounds(cfg)
    if rounds is None:
        return method
    from skrr.experiments.methods import method_from_config

    return method_from_config(OmegaConf.merge(cfg.method, {"max_rounds": rounds}))[1]


def search(cfg: DictConfig, store: CellStore, method_name: str, method: PruningMethod, spec: PipelineSpec,
           device: torch.device, tracker: Tracker) -> tuple[PruningPlan, dict[str, PruningPlan]]:
    """The cell's plans: the main encoder's (from the cell folder, a given plan file, or the cached search of
    ``method``) and one per other encoder of ``encoders=`` (SD3's CLIPs, each searched on its own calibration
    set and cached on its own; ``plan_<name>.json`` in the cell folder)."""
    extra_targets = extra_encoders(cfg, spec, method_name)
    if store.done("search"):
        plan = store.load_plan()
        extras = {name: store.load_plan(name) for name in extra_targets}
        log.info("search: done before -> %s", plan.summary())
        _log_plans(tracker, plan, extras)  # another experiment may mirror this cell under its own W&B group
        return plan, extras
    if cfg.plan_file:
        encoder, _ = load_text_encoder(spec, device)
        try:
            plan = PruningPlan.from_json(cfg.plan_file).validate(signature(encoder))
        except PlanError as err:  # name the encoder loaded here too, not only the plan's
            raise PlanError(f"plan_file={cfg.plan_file} does not fit pipeline={spec.name}, whose encoder is "
                            f"{signature(encoder).describe()}: {err}") from err
    else:
        targets = [float(cfg.sparsity), *map(float, cfg.search_sparsities)]
        plan = search_plans(cfg, method, method_name, spec, device, targets, store.results)[
            round(float(cfg.sparsity), 6)]
    extras = {}
    searcher = clip_method(cfg, method) if extra_targets else method
    for name, target in extra_targets.items():
        log.info("search: %s of %s at %.4f", name, spec.name, target)
        extras[name] = search_plans(cfg, searcher, method_name, spec, device, [target], store.results,
                                    which=name)[target]
    for name, found in extras.items():
        atomic_write_text(store.plan_path_of(name), found.to_json() + "\n")
    atomic_write_text(store.plan_path, plan.to_json() + "\n")
    info = {"summary": plan.summary(), "realized_sparsity": plan.meta.get("realized_sparsity")}
    if extras:
        info["encoders"] = {name: {"summary": p.summary(), "realized_sparsity": p.meta.get("realized_sparsity")}
                            for name, p in extras.items()}
    store.mark_done("search", info)
    _log_plans(tracker, plan, extras)
    log.info("search: %s", plan.summary())
    for name, found in extras.items():
        log.info("search: %s: %s", name, found.summary())
    return plan, extras


def _log_plans(tracker: Tracker, plan: PruningPlan, extras: dict[str, PruningPlan]) -> None:
    tracker.log_plan(plan)
    for name, found in extras.items():
        tracker.log_plan(found, f"plan_{name}")


def pruned_pipeline(spec: PipelineSpec, plan: PruningPlan, device: torch.device,
                    call: dict[str, Any] | None = None,
                    extras: dict[str, PruningPlan] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """The pipeline with its text encoder replaced by the plan's physically smaller one (or its weights zeroed),
    and its denoiser pruned when the plan carries a denoiser rule (the SD2 study); returns (pipe, denoiser report).
    ``extras``: skip / re-use plans of other text encoders by name (SD3's CLIP-L/G), loaded pruned the same way.

    The denoiser is pruned before the encoder: Wanda's U-Net activations come from denoising steps conditioned
    on the dense encoder's features, as the encoder's own norms come from the dense encoder."""
    from baselines import changes_encoder, prune_denoiser, prune_encoder, zeroes_weights

    others = {name: load_pruned_text_encoder(spec, p, device, name)[0] for name, p in (extras or {}).items()}
    if not plan.is_identity and not plan.merged and not zeroes_weights(plan):
        # Skip / re-use plans: read only the kept tensors of the dense checkpoint, cast each one, straight
        # to the device (the dense encoder never exists); the pipeline then loads without its text encoder.
        encoder, _ = load_pruned_text_encoder(spec, plan, device)
        return load_pipeline(spec, device, text_encoder=encoder, encoders=others), None
    # LaCo merges compute new weights, magnitude and Wanda zero inside tensors: they need the dense encoder.
    pipe = load_pipeline(spec, device, encoders=others)
    report = None
    if "denoiser" in plan.meta:
        report = prune_denoiser(pipe, denoiser_of(pipe), plan, call or {})
    if changes_encoder(plan):
        encoder = text_encoder_of(pipe, spec)
        set_text_encoder(pipe, spec, prune_encoder(encoder, plan))
        del encoder  # the dropped weights are freed here
    return pipe, report


def denoiser_call(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline-call settings under which Wanda records the denoiser's activations: the cell's size, steps
    and guidance (one sample per calibration prompt)."""
    s = generation_settings(cfg)
    return {"height": s.height, "width": s.width, "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale, **s.call_kwargs}


def generation_settings(cfg: DictConfig) -> Any:
    """The pipeline's generation settings; the call encodes prompts as calibration did (the pipeline's
    ``PromptEncoding``: token length, PixArt-Σ's caption cleaning; SPEC §1 trap 3)."""
    from eval.score import settings_from_config

    extra = OmegaConf.to_container(cfg.pipeline.call_kwargs, resolve=True)
    encoding = PipelineSpec.from_config(cfg.pipeline).encoding.call_kwargs()
    for key in sorted(set(extra) & set(encoding)):
        raise ValueError(f"pipeline.call_kwargs.{key} would make generation encode prompts unlike calibration; "
                         f"remove it and set pipeline.{key} instead")
    return settings_from_config(cfg.pipeline.generation, {**extra, **encoding}, seed=int(cfg.seed))


def _generate_into(cfg: DictConfig, pipe: "LazyPipeline", root: Path) -> dict:
    from eval.score import generate_all

    return generate_all(cfg.eval, pipe, root, generation_settings(cfg), extra=pipe.identity(), overwrite=cfg.overwrite)


class LazyPipeline:
    """The (pruned) pipeline of a cell, loaded on its first call: a rerun whose images exist loads nothing.

    ``plan=None`` is the dense pipeline. Callable like the diffusers pipeline it stands for.
    """

    def __init__(self, spec: PipelineSpec, plan: PruningPlan | None, device: torch.device,
                 call: dict[str, Any] | None = None, report_path: Path | None = None, quantize: str = "none",
                 drop_text_encoder: bool = False, extras: dict[str, PruningPlan] | None = None):
        self.spec, self.plan, self.device, self._pipe = spec, plan, device, None
        self.extras = dict(extras or {})  # other pruned text encoders by name (SD3's CLIP-L/G; encoders=)
        self.call, self.report_path = call, report_path  # denoiser pruning: Wanda's calls; where its report goes
        self.quantize = quantize or "none"  # the cell's quantize=: applied to the (pruned) text encoder once built
        self.drop_text_encoder = drop_text_encoder  # SD3 without T5 (a dense cell; run.py checks)

    def get(self) -> Any:
        if self._pipe is None:
            if self.plan is None or self.drop_text_encoder:
                self._pipe = load_pipeline(self.spec, self.device, drop_text_encoder=self.drop_text_encoder)
            else:
                self._pipe, report = pruned_pipeline(self.spec, self.plan, self.device, self.call, self.extras)
                if report is not None and self.report_path is not None:
                    atomic_write_json(self.report_path, report)
            if self.quantize != "none":
                quantize_text_encoder(self._pipe, self.spec, self.quantize, self.device)
        return self._pipe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.get()(*args, **kwargs)

    def identity(self) -> dict[str, Any]:
        """Which pipeline and which encoder make the images (not how the plan was found): the folder identity."""
        from baselines import changes_encoder

        dense = self.plan is None or not changes_encoder(self.plan)
        identity = {"pipeline": self.spec.name, "model_id": self.spec.model_id, "revision": self.spec.revision,
                    "plan": "dense" if dense else self.plan.fingerprint()}
        if not dense and "denoiser" in self.plan.meta:  # the U-Net rule changes the images too
            identity["denoiser"] = self.plan.meta["denoiser"]
        if self.extras:  # so do SD3's pruned CLIPs (absent when none: T5-only folders still match)
            identity["encoders"] = {name: p.fingerprint() for name, p in sorted(self.extras.items())}
        if self.drop_text_encoder:
            identity["drop_text_encoder"] = True
        if self.quantize != "none":  # so do quantized encoder weights (absent when none: old folders still match)
            identity["quantize"] = self.quantize
        return identity


def quantize_text_encoder(pipe: Any, spec: PipelineSpec, mode: str, device: torch.device) -> None:
    """Quantize the pipeline's pruned text encoder (T5 for PixArt-Σ / SD3 / FLUX) in place, after pruning and before
    generation and cost: ``quantize=int8`` on a dense cell is "Dense int8", on a Skrr cell "Skrr + int8"."""
    from skrr.quantize import quantize_encoder

    set_text_encoder(pipe, spec, quantize_encoder(text_encoder_of(pipe, spec), mode, device))


def generate(cfg: DictConfig, store: CellStore, pipe: LazyPipeline, tracker: Tracker) -> None:
    """Images of every prompt set the selected metrics need (only the missing ones)."""
    if not cfg.eval:
        log.info("generate: no metrics selected (eval=none), nothing to generate")
        return
    if store.done("generate"):
        log.info("generate: done before")
        return
    from eval.generate import read_manifest

    # Locked like the search: a second process running this cell (or a cell that needs these dense images,
    # see dense_images) waits here, then finds the stage done instead of generating every image again.
    with store.images_lock():
        if store.done("generate"):
            log.info("generate: done before (by another process)")
            return
        results = _generate_into(cfg, pipe, store.images_dir)
        counts = {name: r.n_images for name, r in results.items()}
        store.mark_done("generate", {"images": counts})
    for name, r in results.items():
        rows = read_manifest(r.out_dir)[:4]
        tracker.log_images([r.out_dir / row["file"] for row in rows], [row["prompt"] for row in rows],
                           key=f"samples/{name}")
    log.info("generate: %s", counts)


def dense_images(cfg: DictConfig, store: CellStore, spec: PipelineSpec, device: torch.device) -> Path:
    """The dense run's image folder for this pipeline and seed, generating what is missing (locked)."""
    if store.cell.method == "dense":
        return store.images_dir
    dense = CellStore(store.results, Cell(spec.name, "dense", 0.0, store.cell.seed), {}, store.experiment)
    root = dense.images_dir
    with dense.images_lock():
        _generate_into(cfg, LazyPipeline(spec, None, device), root)  # loads the pipeline only if images are missing
    return root


def score(cfg: DictConfig, store: CellStore, pipe: LazyPipeline, device: torch.device, tracker: Tracker) -> dict:
    """One JSON per selected metric under metrics/ (existing ones are kept)."""
    from eval.score import ScoreContext, metric_specs, score_all

    specs = metric_specs(cfg.eval)
    if not specs:
        log.info("score: no metrics selected (eval=none)")
        return {}
    todo = [k for k in specs if not store.metric_path(k).exists()]
    if not todo:
        log.info("score: done before")
        values, backbones = _read_metrics({k: store.metric_path(k) for k in specs})
        tracker.log_metrics(values, backbones=backbones)
        return values
    needs_dense = any(specs[k]["metric"] in DENSE_METRICS or specs[k].get("ref_dir") == "dense" for k in todo)
    dense_root = dense_images(cfg, store, pipe.spec, device) if needs_dense else None
    plan = pipe.plan
    context = ScoreContext(device=str(device), target_sparsity=float(cfg.sparsity),
                           realized_sparsity=plan.meta.get("realized_sparsity"),
                           pipeline=pipe.get() if any(specs[k]["metric"] == "cost" for k in todo) else None,
                           settings=generation_settings(cfg),
                           info={"cell": store.cell.label(), "plan": plan.summary(), "signature": store.signature})
    paths = score_all(cfg.eval, store.images_dir, dense_root, store.metrics_dir, context)
    values, backbones = _read_metrics(paths)
    store.mark_done("score", {"metrics": values})
    tracker.log_metrics(values, backbones=backbones)
    return values


def _read_metrics(paths: dict[str, Path]) -> tuple[dict[str, float | None], dict[str, str | None]]:
    """(headline value, backbone label) of each metric file, each file read once; W&B names a stand-in's
    metric by its backbone (tracking.metric_name)."""
    from skrr.experiments.store import read_json

    records = {k: read_json(p) for k, p in paths.items()}
    return {k: r.get("value") for k, r in records.items()}, {k: r.get("backbone") for k, r in records.items()}
