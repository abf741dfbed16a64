"""Run one cell (pipeline, method, sparsity, seed) through the stages search -> generate -> score.

    python run.py method=skrr sparsity=0.419                       # PixArt-Σ, needs the hub weights
    python run.py pipeline=tiny method=skrr sparsity=0.3           # offline, seconds
    python run.py -m experiment=table1 hydra/launcher=submitit_slurm +launcher=slurm

Outputs go to ``<paths.results>/runs/<pipeline>/<method>[-<tag>]/s<sparsity>/seed<seed>/`` (skrr/experiments/store.py);
finished stages are skipped on a rerun. Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("pipeline", "method", "calib", "eval", "experiment", "logger", "paths")
log = logging.getLogger("skrr.run")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a missing asset: reported in one line, exit code 2."""
    from eval import EvalError
    from skrr.calib import CalibrationError
    from skrr.experiments.store import StoreError
    from skrr.interface import MethodError, SparsityError
    from skrr.pipelines import ModelUnavailableError
    from skrr.plan import PlanError

    return (EvalError, CalibrationError, MethodError, SparsityError, ModelUnavailableError, PlanError, StoreError)


def check_group_choices(argv: list[str]) -> str | None:
    """A one-line message for an override naming a config that does not exist (before Hydra's long one)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        for choice in value.strip("[]").split(","):
            choice = choice.strip()
            if choice and not (CONFIG_DIR / key / f"{choice}.yaml").exists():
                options = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
                return f"unknown {key} {choice!r}; choose one of: {', '.join(options)} (configs/{key}/)"
    return None


def resolve_cell(cfg: DictConfig) -> tuple[DictConfig, str]:
    """Apply ``sweep.cells[cell]`` when a cell index is given; return (config, method key)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if cfg.get("cell") is None:
        return cfg, hc.runtime.choices["method"]
    cells = cfg.sweep.cells
    if not 0 <= int(cfg.cell) < len(cells):
        raise IndexError(f"cell={cfg.cell} is out of range: experiment {cfg.experiment!r} has {len(cells)} "
                         f"cells (0..{len(cells) - 1})")
    overrides = [o for o in hc.overrides.task if not o.startswith("cell=")] + list(cells[int(cfg.cell)])
    full = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    key = full.hydra.runtime.choices["method"]
    with_cell = OmegaConf.to_container(full, resolve=False)
    with_cell.pop("hydra")
    log.info("cell %s of %s: %s", cfg.cell, cfg.experiment, " ".join(cells[int(cfg.cell)]))
    return OmegaConf.create(with_cell), key


def config_that_matters(cfg: DictConfig) -> dict[str, Any]:
    """What determines a cell's plan and images (its signature); metric settings live in each metric file."""
    keep = {k: cfg[k] for k in ("pipeline", "method", "calib", "sparsity", "search_sparsities", "seed", "plan_file")}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def pick_device(name: str) -> Any:
    """'auto' -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_cell(cfg: DictConfig) -> Path:
    """All stages of one cell; returns the cell folder."""
    from skrr.experiments import stages
    from skrr.experiments.methods import method_from_config
    from skrr.interface import SparsityError, check_sparsity
    from skrr.pipelines import PipelineSpec
    from skrr.experiments.store import Cell, CellStore

    cfg, method = resolve_cell(cfg)
    sparsity = check_sparsity(cfg.sparsity)
    if method == "dense" and sparsity != 0:
        raise SparsityError(f"method=dense prunes nothing; use sparsity=0 (got {sparsity})")
    spec = PipelineSpec.from_config(cfg.pipeline)
    stages.generation_settings(cfg)  # refuses call_kwargs that contradict the pipeline's prompt encoding
    _, pruner = method_from_config(cfg.method)  # checks the method's settings before anything is written
    from eval.score import metric_specs

    metric_specs(cfg.eval)  # an unknown metric or an unsupported FID mode is refused before anything is written
    device = pick_device(cfg.device)
    results = Path(cfg.paths.results)
    cell = Cell(spec.name, method, sparsity, int(cfg.seed), cfg.tag or "")
    store = CellStore(results, cell, config_that_matters(cfg), cfg.experiment).open(cfg.overwrite)
    log.info("cell %s -> %s", cell.label(), store.dir)
    with stages.tracker_for(cfg, store) as tracker:
        plan = stages.search(cfg, store, method, pruner, spec, device, tracker)
        pipe = stages.LazyPipeline(spec, plan, device, call=stages.denoiser_call(cfg),
                                   report_path=store.dir / "denoiser.json")
        if "generate" in cfg.stages:
            stages.generate(cfg, store, pipe, tracker)
        if "score" in cfg.stages:
            stages.score(cfg, store, pipe, device, tracker)
    print(f"done: {cell.label()}  {plan.summary()}\n  results: {store.dir}")
    return store.dir


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    bad_input = user_errors() + (IndexError, ValueError)
    try:
        run_cell(cfg)
    except (*bad_input, InstantiationException) as err:
        # One line naming the problem and the fix (SKRR_DEBUG=1 shows the traceback). A config object that
        # refused its settings (e.g. an eval backbone) is reported by its own message.
        cause, where = err, ""
        if isinstance(err, InstantiationException):
            cause, where = err.__cause__, str(err).rpartition("full_key: ")[2].strip() + ": "
        if os.environ.get("SKRR_DEBUG") == "1" or not isinstance(cause, bad_input + (TypeError,)):
            raise
        print(f"error: {where}{cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
