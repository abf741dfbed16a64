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
from skrr.pipelines import PipelineSpec, load_caption_projection, load_text_encoder
from skrr.plan import PruningPlan
from skrr.experiments.store import PlanCache, canonical
from skrr.surgery import signature

log = logging.getLogger(__name__)


def calibration_set(cfg: DictConfig, encoder: torch.nn.Module, tokenizer: Any, spec: PipelineSpec,
                    device: torch.device, granularity: str | None = None) -> CalibrationSet:
    """The CalibrationSet every method of a run shares, from ``cfg.calib``."""
    c = cfg.calib
    path = Path(c.prompts) if c.prompts else DEFAULT_PROMPTS
    prompts = sample_prompts(load_prompts(path, c.column), c.num_calib_prompts, c.seed)
    log.info("calibration: %d prompts from %s (hash %s)", len(prompts), path, prompt_hash(prompts))
    projection = load_caption_projection(spec, device) if c.use_projection else None
    return CalibrationSet(encoder, tokenizer, prompts, projection, encoding=spec.encoding,
                          metric=c.metric, use_projection=c.use_projection, null_prompt=c.null_prompt,
                          token_mask=c.token_mask, batch_size=c.batch_size, granularity=granularity,
                          device=device)


def search_plans(cfg: DictConfig, method: PruningMethod, name: str, spec: PipelineSpec, device: torch.device,
                 sparsities: Sequence[float], results: Path) -> dict[float, PruningPlan]:
    """Plans for every target sparsity, from the shared plan cache or one search (then cached)."""
    sparsities = sorted({round(check_sparsity(s), 6) for s in sparsities})
    encoder, tokenizer = load_text_encoder(spec, device)
    sig = signature(encoder)
    cache = PlanCache(results)
    calib_cfg = OmegaConf.to_container(cfg.calib, resolve=True) if name != "dense" else {}
    # The targets are part of the key: a beam search run further can pick a different best path, so a
    # plan is only shared between cells that asked for the same set of targets (one experiment's cells).
    # The pipeline (its caption projection) and how it encodes prompts change D, hence the plans.
    encoding = ",".join(f"{k}={v}" for k, v in spec.encoding.describe().items())
    key = cache.key(f"{sig.model_id}|{sig.arch}|{sig.revision}|{spec.dtype}|{spec.kind}|{spec.model_id}|{encoding}",
                    calib_cfg, {"name": name, "targets": [_skey(s) for s in sparsities],
                                **_jsonable(method.settings())})
    path = cache.path(sig.model_id or sig.arch, name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent cells of one sweep wait for the first search
        record = cache.get(path)
        if record is None:
            start = time.time()
            if name == "dense":
                from skrr.surgery import identity_plan

                found = {s: identity_plan(encoder).with_meta(target_sparsity=0.0, realized_sparsity=0.0)
                         for s in sparsities}
            elif not method.needs_calibration:  # weights only: skip encoding 1k prompts
                calib = CalibrationSet(encoder, tokenizer, [""], None, encoding=spec.encoding,
                                       use_projection=False, null_prompt=False, device=device,
                                       granularity=_granularity(method, encoder))
                found = method.search_many(calib, sparsities)
            else:
                calib = calibration_set(cfg, encoder, tokenizer, spec, device,
                                        granularity=_granularity(method, encoder))
                found = method.search_many(calib, sparsities)
            seconds = round(time.time() - start, 2)
            record = {"method": name, "encoder": sig.describe(), "search_seconds": seconds,
                      "plans": {_skey(s): p.with_meta(search_seconds=seconds).to_dict() for s, p in found.items()}}
            cache.put(path, record)
            log.info("searched %s for %s in %.1fs -> %s", name, sparsities, seconds, path)
        else:
            log.info("reusing cached %s plans from %s", name, path)
    return {s: PruningPlan.from_dict(record["plans"][_skey(s)]) for s in sparsities}


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
