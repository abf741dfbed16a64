"""Sparsity vs every metric of a table, one line per method (the paper's Fig. 5), as a PNG.

    python scripts/plot.py table=table1 [results=PATH] [out=PATH]   # default <results>/tables/<table>.png

make_table.py writes the same plot beside the tables; this draws it alone. Exit 1 on an error.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from skrr.io import atomic_write_bytes
from skrr.experiments.store import StoreError
from skrr.experiments.reference import build_table, load_table
from skrr.experiments.render import render_plot
from skrr.experiments.results import CONFIG_DIR, TableError, experiment_cells, parse_cli, results_arg


def main(argv: list[str]) -> int:
    """Draw the plot of one table; return the exit code."""
    try:
        args = parse_cli(argv, {"table", "results", "out", "config_dir"})
        config_dir = Path(args.get("config_dir") or CONFIG_DIR)
        if "table" not in args:
            raise TableError("which table? usage: python scripts/plot.py table=<name> [results=PATH] [out=PATH]")
        results = results_arg(args, config_dir)
        spec = load_table(args["table"], config_dir)
        png = render_plot(build_table(spec, experiment_cells(spec.experiment, config_dir), results))
    except (TableError, StoreError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    if png is None:
        print(f"{spec.name}: no results yet under {results}; nothing to plot")
        return 0
    out = Path(args.get("out") or results / "tables" / f"{spec.name}.png")
    atomic_write_bytes(out, png)
    print(out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
