"""Which cells of a sweep are done (per stage and metric), which are missing, and the commands that fill them.

    python scripts/status.py experiment=table1 [results=PATH]
    python scripts/status.py                      # every experiment in configs/experiment/

Reads the results on disk only. Exit code 0 (1 on an unreadable results file or unknown experiment).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from skrr.experiments.store import StoreError
from skrr.experiments.results import CONFIG_DIR, TableError, names, parse_cli, results_arg, status_lines


def main(argv: list[str]) -> int:
    """Print the status of the requested experiments; return the exit code."""
    try:
        args = parse_cli(argv, {"experiment", "results", "config_dir"})
        config_dir = Path(args.get("config_dir") or CONFIG_DIR)
        todo = [args["experiment"]] if args.get("experiment") else names("experiment", config_dir)
        results = results_arg(args, config_dir)
        reports = [status_lines(name, results, config_dir) for name in todo]
    except (TableError, StoreError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    for lines, _, _ in reports:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
