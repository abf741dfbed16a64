"""The search stage: build the calibration set, run (or reuse) a method's search, return the cell's plan.

Searched plans are cached per encoder + calibration + method settings under ``<results>/plans/`` and
shared by every cell that needs them; a file lock keeps concurrent Slurm jobs from searching twice.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from skrr.calib import DEFAULT_PROMPTS, CalibrationSet, load_prompts, prompt_hash, sample_prompts
from skrr.interface import PruningMethod, check_sparsity
from skrr.pipelines import MAIN, TINY_KINDS, PipelineSpec, load_caption_projection, load_text_encoder, sd3_clip_readout
from skrr.plan import PruningPlan
from skrr.experiments.store import PlanCache, canonical, remove_empty_parents
from skrr.surgery import signature

log = logging.getLogger(__name__)


def calibration_set(cfg: DictConfig, encoder: torch.nn.Module, tokenizer: Any, spec: PipelineSpec,
                    device: torch.device, granularity: str | None = None, which: str = MAIN) -> CalibrationSet:
    """The CalibrationSet every method of a run shares, from ``cfg.calib`` (``which``: SD3's clip_l / clip_g are
    scored on what SD3's denoiser receives from them, with ``cfg.sd3_clip``'s choices: skrr/readout.py)."""
    c = cfg.calib
    path = Path(c.prompts) if c.prompts else DEFAULT_PROMPTS
    prompts = sample_prompts(load_prompts(path, c.column), c.num_calib_prompts, c.seed)
    log.info("calibration: %d prompts from %s (hash %s)", len(prompts), path, prompt_hash(prompts))
    projection, encoding, readout = None, spec.encoding, None
    if which != MAIN:
        from skrr.readout import sd3_clip_encoding

        choice = cfg.sd3_clip
        readout = sd3_clip_readout(spec, which, prompts, device, encoder=encoder,
                                   pooled_weight=float(choice.pooled_weight),
                                   clip_last_block=bool(choice.last_block_prunable),
                                   use_projection=c.use_projection, batch_size=c.batch_size)
        encoding = sd3_clip_encoding(tokenizer)
    elif c.use_projection:
        projection = load_caption_projection(spec, device)
    return CalibrationSet(encoder, tokenizer, prompts, projection, encoding=encoding, readout=readout,
                          metric=c.metric, use_projection=c.use_projection, null_prompt=c.null_prompt,
                          token_mask=c.token_mask, batch_size=c.batch_size, granularity=granularity,
                          device=device)


def search_plans(cfg: DictConfig, method: PruningMethod, name: str, spec: PipelineSpec, device: torch.device,
                 sparsities: Sequence[float], results: Path, which: str = MAIN) -> dict[float, PruningPlan]:
    """Plans for every target sparsity of text encoder ``which``, from the shared plan cache or one search (then
    cached)."""
    sparsities = sorted({round(check_sparsity(s), 6) for s in sparsities})
    encoder, tokenizer = load_text_encoder(spec, device, which)
    sig = signature(encoder)
    cache = PlanCache(results)
    calib_cfg = OmegaConf.to_container(cfg.calib, resolve=True) if name != "dense" else {}
    if which != MAIN and calib_cfg:  # the SD3 CLIP readout's choices change D; the T5's key stays as it was
        calib_cfg = {**calib_cfg, "encoder": which, "sd3_clip": OmegaConf.to_container(cfg.sd3_clip, resolve=True)}
    # The targets are not part of the key: every method's plan at s is independent of the other targets
    # (Skrr runs a fixed number of rounds, the baselines take prefixes of one order), so one cached record
    # serves every sweep and grows by the targets it was not yet asked for.
    # The pipeline (its caption projection) and how it encodes prompts change D, hence the plans.
    encoding = ",".join(f"{k}={v}" for k, v in spec.encoding.describe().items())
    # A tiny pipeline's weights come from its seed, not from a checkpoint its id names; seed 0 adds nothing to
    # the key, so records cached before the seed counted still serve it.
    weights = f"|seed={spec.seed}" if spec.kind in TINY_KINDS and spec.seed else ""
    key = cache.key(f"{sig.model_id}|{sig.arch}|{sig.revision}|{spec.dtype}|{spec.kind}|{spec.model_id}|{encoding}"
                    f"{weights}",
                    calib_cfg, {"name": name, **_jsonable(method.settings())})
    path = cache.path(sig.model_id or sig.arch, name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = _search_locked(cfg, method, name, spec, device, sparsities, encoder, tokenizer, sig, cache, path,
                                which)
    except BaseException:
        # A failed search leaves no stray lock (nor empty plan folders) when no plan was ever cached here.
        if not path.exists():
            Path(str(path) + ".lock").unlink(missing_ok=True)
            remove_empty_parents(path.parent, Path(results))
        raise
    return {s: PruningPlan.from_dict(record["plans"][_skey(s)]) for s in sparsities}


def _search_locked(cfg: DictConfig, method: PruningMethod, name: str, spec: PipelineSpec, device: torch.device,
                   sparsities: list[float], encoder: torch.nn.Module, tokenizer: Any, sig: Any, cache: PlanCache,
                   path: Path, which: str = MAIN) -> dict[str, Any]:
    """The cached search record at ``path``, searching (once, under its lock) when it is missing."""
    with FileLock(str(path) + ".lock"):  # concurrent cells of one sweep wait for the first search
        record = cache.get(path) or {"method": name, "encoder": sig.describe(), "search_seconds": 0.0, "plans": {}}
        missing = [s for s in sparsities if _skey(s) not in record["plans"]]
        if missing:
            start = time.time()
            if name == "dense":
                from skrr.surgery import identity_plan

                found = {s: identity_plan(encoder).with_meta(target_sparsity=0.0, realized_sparsity=0.0)
                         for s in missing}
            elif not method.needs_calibration:  # weights only: skip encoding 1k prompts
                calib = CalibrationSet(encoder, tokenizer, [""], None, encoding=spec.encoding,
                                       use_projection=False, null_prompt=False, device=device,
                                       granularity=_granularity(method, encoder))
                found = method.search_many(calib, missing)
            else:
                calib = calibration_set(cfg, encoder, tokenizer, spec, device,
                                        granularity=_granularity(method, encoder), which=which)
                found = method.search_many(calib, missing)
            seconds = round(time.time() - start, 2)
            record["search_seconds"] = round(record["search_seconds"] + seconds, 2)
            record["plans"].update({_skey(s): p.with_meta(search_seconds=seconds).to_dict() for s, p in found.items()})
            cache.put(path, record)
            log.info("searched %s for %s in %.1fs -> %s", name, missing, seconds, path)
        else:
            log.info("reusing cached %s plans from %s", name, path)
    return record


def _granularity(method: PruningMethod, encoder: torch.nn.Module) -> str:
    """The method's granularity, or the encoder's only one (BERT: blocks)."""
    from skrr.families import family_of

    fam = family_of(encoder)
    return method.granularity if method.granularity in fam.granularities else fam.granularities[0]


def _skey(s: float) -> str:
    return f"{float(s):.6f}"


def _jsonable(d: dict[str, Any]) -> Any:
    import json

    return json.loads(canonical(d))
