"""Weights & Biases mirror of one cell: config, plan, metrics and a few sample images.

W&B is never the source of truth: nothing here reads back from it, and a W&B failure only logs a
warning. The run id is derived from the cell, its config signature and the experiment, so a resumed or re-issued
cell logs into the same run (``resume="allow"``). Offline runs go to ``<results>/wandb/offline-run-*``
(sync later with ``wandb sync <results>/wandb/offline-run-*``).

    tracker = Tracker(cfg.logger, cell, store.signature, group=cfg.experiment, config=resolved, results=...)
    tracker.log_plan(plan); tracker.log_metrics({"clip": 0.31}, backbones={"clip": "openai/clip-vit-base-patch32"})
    tracker.log_images(paths, prompts); tracker.finish()

Labels travel with the numbers: a metric measured with a stand-in backbone (eval/backbones.py marks them, see
``results.STAND_IN``) is logged as ``stand_in/<metric>@<backbone>``, never as ``metrics/<metric>``, so a W&B
chart of ``metrics/fid`` only holds numbers that may be set against the paper's; every metric's run summary
carries ``<name>/backbone`` with the full label. ``log_table`` mirrors a finished paper table as a W&B table.
"""
from __future__ import annotations

import logging
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from skrr.plan import PruningPlan
from skrr.experiments.results import STAND_IN
from skrr.experiments.store import Cell, short_hash

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")


def run_id(cell: Cell, signature: str, group: str = "adhoc") -> str:
    """Deterministic W&B run id: same cell, config signature and experiment -> same run (resumed).

    The experiment is part of the id because experiments share cells (Table 2 re-uses Table 1's folders):
    each experiment's W&B group then holds a run for every one of its cells.
    """
    return short_hash({"cell": cell.label(), "signature": signature, "group": group}, 16)


def metric_name(key: str, backbone: str | None, prefix: str = "metrics/") -> str:
    """W&B name of metric ``key``: ``<prefix><key>``, or ``stand_in/<key>@<backbone>`` for a stand-in backbone."""
    if backbone and STAND_IN.search(backbone):
        short = re.split(r"[\s(]", backbone.strip(), maxsplit=1)[0]
        return f"stand_in/{key}@{short}"
    return f"{prefix}{key}"


def has_api_key() -> bool:
    """Whether a W&B API key is available (``WANDB_API_KEY`` or a ~/.netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(logger_cfg: Mapping[str, Any]) -> str:
    """online | offline | disabled: ``logger.enabled`` then ``logger.mode``, then ``WANDB_MODE``, then the API key."""
    if not logger_cfg.get("enabled", True):
        return "disabled"
    mode = logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(str(mode), str(mode))
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not one of {MODES} (or null for automatic)")
    return mode


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'geneval': {'tasks': {'counting': .4}}} -> {'geneval/tasks/counting': .4}; numbers and strings only."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


def _plain(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict of a config (an OmegaConf node is resolved where it can be)."""
    if config is None:
        return {}
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(config, DictConfig):
        try:
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
        except (OmegaConfBaseException, ValueError):  # ${hydra:...} outside a Hydra app: keep the text
            return OmegaConf.to_container(config, resolve=False)  # type: ignore[return-value]
    return dict(config)


class Tracker:
    """W&B run of one cell; a no-op when logging is off (``logger.enabled=false`` or mode disabled)."""

    def __init__(self, logger_cfg: Mapping[str, Any], cell: Cell, signature: str, group: str = "adhoc",
                 config: Mapping[str, Any] | None = None, results: str | Path | None = None) -> None:
        self.cell = cell
        self.id = run_id(cell, signature, group)
        self.mode = resolve_mode(logger_cfg)
        self.run: Any = None
        if self.mode == "disabled":
            return
        config = _plain(config)
        root = Path(results or config.get("paths", {}).get("results") or "results")
        root.mkdir(parents=True, exist_ok=True)
        tags = [cell.method, cell.pipeline, group] + ([cell.method_dir] if cell.method_dir != cell.method else [])
        try:
            import wandb  # imported here: a disabled tracker has no wandb side effects

            self.run = wandb.init(
                project=logger_cfg.get("project") or "skrr", entity=logger_cfg.get("entity"), id=self.id,
                name=cell.label(), group=group, job_type=cell.method, tags=tags, config=config,
                resume="allow", mode=self.mode, dir=str(root), reinit="finish_previous")
        except Exception as err:  # W&B is a mirror: its failure must never stop a cell
            log.warning("W&B disabled for %s: %s: %s", cell.label(), type(err).__name__, err)
            self.run = None
            return
        log.info("W&B %s run %s (%s) in %s", self.mode, self.id, cell.label(), self.run.dir)

    @property
    def enabled(self) -> bool:
        """Whether a W&B run is open."""
        return self.run is not None

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Call a W&B function; on failure log one warning (the results on disk are unaffected)."""
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # a W&B hiccup must not fail a finished stage
            log.warning("W&B %s failed for %s: %s: %s", what, self.cell.label(), type(err).__name__, err)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Add (or update) config entries of the run."""
        if self.run is not None:
            self._guard("config", self.run.config.update, _plain(config), allow_val_change=True)

    def log_plan(self, plan: PruningPlan, key: str = "plan") -> None:
        """Plan summary, target and realized sparsity, removal order and skipped/re-used units, under ``key``
        (``plan_clip_l`` etc. for the other encoders of an ``encoders=`` cell)."""
        if self.run is None:
            return
        meta = plan.meta
        summary = {f"{key}/summary": plan.summary(), f"{key}/method": plan.method,
                   f"{key}/granularity": plan.granularity, f"{key}/fingerprint": plan.fingerprint(),
                   f"{key}/num_skipped": len(plan.skipped), f"{key}/num_reused": len(plan.reused),
                   f"{key}/skipped": ",".join(map(str, plan.skipped)),
                   f"{key}/reused": ",".join(f"{i}->{j}" for i, j in sorted(plan.reused.items()))}
        for name in ("target_sparsity", "realized_sparsity", "prefix"):
            if name in meta:
                summary[f"{key}/{name}"] = meta[name]
        if "order" in meta:
            summary[f"{key}/order"] = ",".join(map(str, meta["order"]))
        if "realized_sparsity" in meta and key == "plan":  # the cell's headline: its main encoder's
            summary["realized_sparsity"] = meta["realized_sparsity"]
        self._guard("plan", self.run.summary.update, summary)

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "metrics/",
                    backbones: Mapping[str, str | None] | None = None) -> None:
        """Log metric values (nested dicts flattened with '/'), e.g. {'geneval': {'value': .44, 'tasks': {...}}}.

        ``backbones`` (metric key -> backbone label) names each metric by what measured it (``metric_name``)
        and puts the label in the run summary as ``<name>/backbone``.
        """
        if self.run is None:
            return
        backbones = backbones or {}
        names = {k: metric_name(k, backbones.get(k), prefix) for k in metrics}
        values: dict[str, Any] = {}
        for k, v in metrics.items():
            values.update(flatten({names[k]: v}))
        self._guard("metrics", self.run.log, values)
        labels = {f"{names[k]}/backbone": b for k, b in backbones.items() if k in names and b}
        if labels:
            self._guard("metric labels", self.run.summary.update, labels)

    def log_images(self, paths: Sequence[str | Path], captions: Sequence[str] | None = None,
                   max_images: int = 8, key: str = "samples") -> None:
        """Log the first ``max_images`` generated images with their prompts as captions."""
        if self.run is None or not paths:
            return
        import wandb

        caps = list(captions) if captions is not None else [""] * len(paths)
        pairs = list(zip(paths, caps))[:max_images]
        self._guard("images", lambda: self.run.log({key: [wandb.Image(str(p), caption=c) for p, c in pairs]}))

    def finish(self) -> None:
        """Close the run (offline runs are then complete on disk)."""
        if self.run is not None:
            self._guard("finish", self.run.finish)
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def log_table(logger_cfg: Mapping[str, Any], name: str, experiment: str, columns: Sequence[str],
              rows: Sequence[Sequence[Any]], notes: Sequence[str] = (), results: str | Path | None = None) -> str | None:
    """Mirror a built table to W&B as a ``wandb.Table`` (key ``table/<name>``) in its own run; returns the run id.

    One run per (table, experiment), resumed when the table is rebuilt. The footnotes (which values come from
    stand-in backbones) go to the summary beside it. A W&B failure is a warning; returns None when logging is off.
    """
    mode = resolve_mode(logger_cfg)
    if mode == "disabled":
        return None
    rid = short_hash({"table": name, "group": experiment}, 16)
    root = Path(results or "results")
    root.mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        run = wandb.init(project=logger_cfg.get("project") or "skrr", entity=logger_cfg.get("entity"), id=rid,
                         name=f"table {name}", group=experiment, job_type="table", tags=["table", name],
                         resume="allow", mode=mode, dir=str(root), reinit="finish_previous")
        try:
            run.log({f"table/{name}": wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
            run.summary.update({f"table/{name}/notes": "\n".join(notes)})
        finally:
            run.finish()
    except Exception as err:  # W&B is a mirror: the table files on disk are the result
        log.warning("W&B table %s not logged: %s: %s", name, type(err).__name__, err)
        return None
    log.info("W&B %s table run %s (%s)", mode, rid, name)
    return rid
