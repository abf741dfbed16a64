"""Run one cell (pipeline, method, sparsity, seed) through the stages search -> generate -> score.

    python run.py method=skrr sparsity=0.419                       # PixArt-Σ, needs the hub weights
    python run.py pipeline=tiny method=skrr sparsity=0.3           # offline, seconds
    python run.py -m experiment=table1 hydra/launcher=submitit_slurm +launcher=slurm

Outputs go to ``<paths.results>/runs/<pipeline>/<method>[-<tag>][+<quantize>]/s<sparsity>/seed<seed>/`` (skrr/experiments/store.py);
finished stages are skipped on a rerun. Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("pipeline", "method", "calib", "eval", "experiment", "logger", "paths")
log = logging.getLogger("skrr.run")
# OSErrors that mean "the results folder cannot be written": one line naming paths.results, exit 2.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a missing asset: reported in one line, exit code 2."""
    from eval import EvalError
    from skrr.experiments.stages import InputError
    from skrr.calib import CalibrationError
    from skrr.experiments.store import StoreError
    from skrr.interface import MethodError, SparsityError
    from skrr.pipelines import ModelUnavailableError
    from skrr.plan import PlanError

    return (InputError, EvalError, CalibrationError, MethodError, SparsityError, ModelUnavailableError, PlanError,
            StoreError)


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


def check_slurm(argv: list[str]) -> str | None:
    """A one-line message when a sweep asks for the Slurm launcher on a machine without Slurm's commands."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun or "hydra/launcher=submitit_slurm" not in argv:
        return None
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if not missing:
        return None
    return (f"no Slurm here: {' and '.join(missing)} not on PATH; run the sweep on a Slurm login node, drop "
            f"hydra/launcher=submitit_slurm to run the cells one after another here, or start a single-node "
            f"Slurm with `sudo scripts/slurm_local.sh up`")


def _composed(overrides: list[str]) -> DictConfig | None:
    """The config these overrides compose to, or None where Hydra has its own message for them."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except Exception:  # noqa: BLE001  (Hydra reports its own composition errors in main())
        return None


def check_before_hydra(argv: list[str]) -> str | None:
    """Problems Hydra would report with a traceback or before run.py runs: an unknown key (``foo=1``,
    ``method.foo=1``) and a results folder that cannot be written (Hydra writes its log folder there first)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # noqa: BLE001  (a syntax error: Hydra's message shows where)
        return None
    groups, values = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.is_add() or o.is_force_add() or key.startswith("hydra") or o.package:
            continue
        first = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        if key in GROUPS or "/" in key:
            groups.append(f"{key}={first}")
        else:
            values.append((key, o, f"{key}={first}"))
    cfg = _composed(groups)
    if cfg is None:
        return None
    cell_given = any(key == "cell" for key, _, _ in values)
    for key, o, _ in values:
        if cell_given and key.startswith("method."):
            continue  # the cell's overrides pick the method; its constructor names an unknown setting
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            given = o.value()
            if isinstance(given, dict) and isinstance(node[leaf], DictConfig):  # encoders={clip_x: 0.3}
                extra = sorted(set(map(str, given)) - set(map(str, node[leaf])))
                if extra:
                    return (f"unknown config key '{key}.{extra[0]}' ({o.input_line}); {key} has: "
                            f"{', '.join(map(str, node[leaf]))}")
            continue
        if parent == "method":
            choice = node.get("name", "?")
            known = ", ".join(k for k in node if k != "name")
            return (f"method.{leaf}: method={choice} has no setting {leaf!r} ({o.input_line}); its settings are "
                    f"{known} (configs/method/{choice}.yaml)")
        where = (f"; {parent or 'the top level'} has: {', '.join(map(str, node))}" if isinstance(node, DictConfig)
                 else "")
        return (f"unknown config key {key!r} ({o.input_line}){where}; check the spelling "
                f"(`python run.py --cfg job` prints every key)")
    cfg = _composed(groups + [line for key, _, line in values])
    if cfg is None:
        return None
    try:
        results = Path(str(cfg.paths.results)).expanduser()
    except Exception:  # noqa: BLE001  (an unresolvable interpolation: Hydra names it)
        return None
    return writable_problem(results)


def writable_problem(results: Path) -> str | None:
    """Why ``paths.results`` cannot hold results (under a file, read-only, disk full), or None.

    Probes the deepest existing folder with a small temporary file (removed at once): os.access cannot see an
    immutable folder or a full disk, and for root it says yes to read-only folders.
    """
    import tempfile

    existing = results
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return (f"paths.results={results} is under {existing}, which is a file, not a folder; set paths.results "
                f"to a folder")
    try:
        with tempfile.TemporaryFile(dir=existing) as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return os_error_line(err, results) if err.errno != errno.ENOENT else None
    return None


def os_error_line(err: OSError, results: Path | str) -> str:
    """One line for a results folder the OS refuses to write to, naming the path and the fix."""
    where = err.filename or results
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left under paths.results={results} ({where}: {err.strerror}); free some space or set "
                f"paths.results to a folder on another disk")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write under paths.results={results} ({where}: {err.strerror}); set paths.results to a "
                f"folder you can write, or fix its permissions")
    return f"cannot write {where} ({err.strerror}); set paths.results to a writable folder"


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
    # The hydra overrides (e.g. hydra/launcher=submitit_slurm) come too: `+launcher=slurm` among the task
    # overrides fills hydra.launcher's keys, which only the Slurm launcher's schema has.
    overrides = (list(hc.overrides.hydra) + [o for o in hc.overrides.task if not o.startswith("cell=")]
                 + list(cells[int(cfg.cell)]))
    full = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    key = full.hydra.runtime.choices["method"]
    with_cell = OmegaConf.to_container(full, resolve=False)
    with_cell.pop("hydra")
    log.info("cell %s of %s: %s", cfg.cell, cfg.experiment, " ".join(cells[int(cfg.cell)]))
    return OmegaConf.create(with_cell), key


def config_that_matters(cfg: DictConfig) -> dict[str, Any]:
    """What determines a cell's plan and images (its signature); metric settings live in each metric file."""
    keep = {k: cfg[k] for k in ("pipeline", "method", "calib", "sparsity", "search_sparsities", "seed", "plan_file")}
    if (cfg.get("quantize") or "none") != "none":  # only then: unquantized cells keep their signature and resume
        keep["quantize"] = cfg.quantize
    if cfg.get("drop_text_encoder"):  # likewise
        keep["drop_text_encoder"] = True
    from skrr.experiments.stages import given_encoders

    encoders = given_encoders(cfg)
    if encoders:  # likewise: SD3 cells that prune its CLIPs too, and how those are scored
        keep["encoders"], keep["sd3_clip"] = encoders, cfg.sd3_clip
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def check_number(cfg: DictConfig, key: str, whole: bool, example: str) -> None:
    """``key`` must hold a number (a whole one for ``whole``): one line naming the key otherwise."""
    from skrr.experiments.stages import InputError

    value = OmegaConf.select(cfg, key)
    many = OmegaConf.is_list(value)
    for v in (value if many else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (whole and not isinstance(v, int)):
            noun = "whole number" if whole else "number"
            kind = f"a list of {noun}s" if many else f"a {noun}"
            raise InputError(f"{key} must be {kind}, got {v!r}{' in it' if many else ''}; e.g. {key}={example}")


def check_method_values(node: DictConfig, method: Any) -> None:
    """A setting the method turned into another value (``method.beam_width=2.5`` would run with k = 2 while
    cell.json records 2.5) is refused, naming the key."""
    from skrr.experiments.stages import InputError

    for key, given in OmegaConf.to_container(node, resolve=True).items():
        used = getattr(method, key, None)
        if isinstance(used, bool) or not isinstance(used, (int, float)) or isinstance(given, bool):
            continue
        if not isinstance(given, (int, float)) or given != used:
            kind = "a whole number" if isinstance(used, int) else "a number"
            raise InputError(f"method.{key} must be {kind}, got {given!r} (the method would use {used!r}); "
                             f"e.g. method.{key}={used!r}")


def pick_device(name: str) -> Any:
    """'auto' -> cuda when available, else cpu; a device this machine lacks is one line naming device=."""
    import torch

    from skrr.experiments.stages import InputError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:<index>") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device={name} but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                             f"is False); use device=cpu, or device=auto to take a GPU where there is one")
        if device.index is not None and device.index >= count:
            raise InputError(f"device={name} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}); "
                             f"pick one of them or device=auto")
    return device


def run_cell(cfg: DictConfig) -> Path:
    """All stages of one cell; returns the cell folder. Every input is checked before the first stage, and a
    failure before any stage finished leaves nothing behind."""
    from eval.score import metric_specs
    from skrr.experiments import stages
    from skrr.experiments.methods import method_from_config
    from skrr.experiments.store import Cell, CellStore, cell_tag
    from skrr.interface import SparsityError, check_sparsity
    from skrr.pipelines import PipelineSpec
    from skrr.quantize import check_mode

    if cfg.get("cell") is not None:
        check_number(cfg, "cell", whole=True, example="0")
    cfg, method = resolve_cell(cfg)
    check_number(cfg, "seed", whole=True, example="0")
    check_number(cfg, "sparsity", whole=False, example="0.419")
    check_number(cfg, "search_sparsities", whole=False, example="[0.270,0.324,0.419]")
    sparsity = check_sparsity(cfg.sparsity)
    if method == "dense" and sparsity != 0:
        raise SparsityError(f"method=dense prunes nothing; use sparsity=0 (got {sparsity})")
    spec = PipelineSpec.from_config(cfg.pipeline)
    stages.generation_settings(cfg)  # refuses call_kwargs that contradict the pipeline's prompt encoding
    _, pruner = method_from_config(cfg.method)  # checks the method's settings before anything is written
    check_method_values(cfg.method, pruner)
    metric_specs(cfg.eval)  # an unknown metric or an unsupported FID mode is refused before anything is written
    device = pick_device(cfg.device)
    quantize = check_mode(cfg.get("quantize"), device)  # nf4 without CUDA: one line before anything is written
    drop = bool(cfg.get("drop_text_encoder"))
    if drop and spec.kind not in ("sd3", "tiny_sd3"):
        raise stages.InputError(f"drop_text_encoder=true is for SD3 (text_encoder_3=None); pipeline={spec.name} "
                                f"needs its T5: use pipeline=sd3 or tiny_sd3, or drop the setting")
    if drop and (method != "dense" or quantize != "none"):
        raise stages.InputError("drop_text_encoder=true runs SD3 without its T5, leaving nothing to prune or "
                                "quantize; use method=dense sparsity=0 quantize=none")
    stages.extra_encoders(cfg, spec, method)  # encoders=: one line before anything is written
    results = Path(cfg.paths.results)
    cell = Cell(spec.name, method, sparsity, int(cfg.seed), cell_tag(cfg.tag, drop), quantize)
    store = CellStore(results, cell, config_that_matters(cfg), cfg.experiment)
    stages.check_inputs(cfg, store, pruner, spec)
    store.open(cfg.overwrite)
    log.info("cell %s -> %s", cell.label(), store.dir)
    try:
        with stages.tracker_for(cfg, store) as tracker:
            plan, extra_plans = stages.search(cfg, store, method, pruner, spec, device, tracker)
            pipe = stages.LazyPipeline(spec, plan, device, call=stages.denoiser_call(cfg),
                                       report_path=store.dir / "denoiser.json", quantize=quantize,
                                       drop_text_encoder=drop, extras=extra_plans)
            if "generate" in cfg.stages:
                stages.generate(cfg, store, pipe, tracker)
            if "score" in cfg.stages:
                stages.score(cfg, store, pipe, device, tracker)
    except (*user_errors(), ValueError, OSError):
        store.discard_unfinished()
        CellStore(results, Cell(spec.name, "dense", 0.0, cell.seed), {}).discard_unfinished()  # dense_images'
        raise
    also = "".join(f"\n  {name}: {p.summary()}" for name, p in extra_plans.items())
    print(f"done: {cell.label()}  {plan.summary()}{also}\n  results: {store.dir}")
    return store.dir


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
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
        refuse(f"{where}{cause}", cfg.paths.results)
    except OSError as err:  # the results folder refused a write (read-only, full, under a file)
        if os.environ.get("SKRR_DEBUG") == "1" or err.errno not in WRITE_ERRNOS:
            raise
        refuse(os_error_line(err, cfg.paths.results), cfg.paths.results)


def refuse(message: str, results: Any = None) -> None:
    """Print the one-line error, remove the run's own Hydra log folder (a single run that did nothing leaves
    nothing), exit 2."""
    print(f"error: {message}", file=sys.stderr)
    if results is not None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from skrr.experiments.store import remove_empty_parents

        hc = HydraConfig.get()
        if hc.mode == RunMode.RUN:  # a sweep's folder holds the other cells' logs too
            out = Path(hc.runtime.output_dir)
            shutil.rmtree(out, ignore_errors=True)
            remove_empty_parents(out.parent, Path(results))
    sys.exit(2)


def cli(argv: list[str]) -> None:
    """``python run.py ARGS``: the checks Hydra cannot make, then Hydra's main."""
    from skrr.quantize import quiet_import_notices

    quiet_import_notices()
    problem = check_group_choices(argv) or check_slurm(argv) or check_before_hydra(argv)
    if problem:
        refuse(problem)
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
