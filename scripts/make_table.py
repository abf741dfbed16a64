"""Build a paper table from the results on disk (never W&B): markdown, LaTeX, CSV and a PNG plot.

    python scripts/make_table.py table=table1                 # -> <paths.results>/tables/table1.{md,tex,csv,png}
    python scripts/make_table.py table=table3 results=/scratch/skrr/results plot=false
    python scripts/make_table.py table=all
    (config_dir=PATH reads another configs/ folder, e.g. in tests)

Tables: configs/table/<name>.yaml. Each built table is also mirrored to W&B as a table (one run per table and
experiment, long format with every value's backbone and comparability), as the root config's `logger` says
(offline runs under <results>/wandb; `WANDB_MODE=disabled` or `logger=none` turns it off). Exit code: 0 complete, 2 cells missing (listed with the commands that
fill them; the partial table is still written), 1 error (one line on stderr; nothing written).
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from skrr.experiments.store import StoreError
from skrr.experiments.render import footnotes, make_table, missing_lines, render_csv
from skrr.experiments.results import CONFIG_DIR, TableError, compose_configs, names, parse_cli, results_arg
from skrr.experiments.tracking import log_table

USAGE = "usage: python scripts/make_table.py table=<name|all> [results=PATH] [plot=true|false]"


def main(argv: list[str]) -> int:
    """Build the requested tables; return the exit code."""
    try:
        args = parse_cli(argv, {"table", "results", "plot", "config_dir"})
        config_dir = Path(args.get("config_dir") or CONFIG_DIR)
        if "table" not in args:
            raise TableError(f"which table? {USAGE}; tables: {', '.join(names('table', config_dir))}")
        todo = names("table", config_dir) if args["table"] == "all" else [args["table"]]
        results = results_arg(args, config_dir)
        plot = args.get("plot", "true").lower() not in ("false", "0", "no")
        built = [make_table(name, results, config_dir, plot) for name in todo]
        logger_cfg = compose_configs(config_dir, [])[0].get("logger") or {"enabled": False}
    except (TableError, StoreError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    for table, _ in built:
        columns, *rows = csv.reader(io.StringIO(render_csv(table)))
        log_table(logger_cfg, table.spec.name, table.spec.experiment, columns, rows, footnotes(table), results)
    for table, files in built:
        state = "complete" if table.complete else f"INCOMPLETE: {len(table.missing)} cell(s) missing"
        print(f"{table.spec.name}: {state}\n  " + "\n  ".join(map(str, files)))
        if not table.complete:
            print("  " + "\n  ".join(missing_lines(table)))
    return 0 if all(t.complete for t, _ in built) else 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
