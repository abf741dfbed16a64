"""The stages of a cell (search -> generate -> score), each skipped when its output is already on disk."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from skrr.io import atomic_write_text
from skrr.pipelines import PipelineSpec, load_text_encoder
from skrr.plan import PruningPlan
from skrr.search import search_plans
from skrr.store import CellStore

log = logging.getLogger(__name__)


def search(cfg: DictConfig, store: CellStore, method_name: str, spec: PipelineSpec, device: torch.device,
           tracker: Any) -> PruningPlan:
    """The cell's plan: from the cell folder, a given plan file, or the (cached) method search."""
    if store.done("search"):
        plan = store.load_plan()
        log.info("search: done before -> %s", plan.summary())
        return plan
    if cfg.plan_file:
        encoder, _ = load_text_encoder(spec, device)
        plan = PruningPlan.from_json(cfg.plan_file).validate(encoder)
    else:
        method = instantiate(cfg.method)
        targets = [float(cfg.sparsity), *map(float, cfg.search_sparsities)]
        plan = search_plans(cfg, method, method_name, spec, device, targets, store.results)[
            round(float(cfg.sparsity), 6)]
    atomic_write_text(store.plan_path, plan.to_json() + "\n")
    store.mark_done("search", {"summary": plan.summary(), "realized_sparsity": plan.meta.get("realized_sparsity")})
    tracker.log_plan(plan)
    log.info("search: %s", plan.summary())
    return plan
