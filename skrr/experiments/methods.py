"""Build the method a config names, from the registry that every method joins where it is defined."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skrr.interface import METHODS, MethodError, PruningMethod, build_method


def registered_methods() -> dict[str, type[PruningMethod]]:
    """Every registered method: Skrr, Dense and each module of ``baselines`` (imported here, once)."""
    import baselines
    import skrr.method  # noqa: F401  (registers Skrr)

    for module in pkgutil.iter_modules(baselines.__path__):
        importlib.import_module(f"baselines.{module.name}")
    return dict(METHODS)


def method_from_config(node: DictConfig | dict[str, Any]) -> tuple[str, PruningMethod]:
    """(name, method) from a ``method`` config node: ``name`` picks the class, every other key is a setting."""
    settings = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = settings.pop("name", None)
    if not name:
        raise MethodError("method config has no 'name' (configs/method/<name>.yaml starts with 'name: <name>')")
    registered_methods()
    return str(name), build_method(str(name), **settings)
