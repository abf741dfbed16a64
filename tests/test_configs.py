"""Every config of every group composes, and each method config builds its registered PruningMethod."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from skrr.experiments.methods import method_from_config, registered_methods
from skrr.interface import PruningMethod
from skrr.pipelines import PipelineSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group", ["pipeline", "method", "calib", "eval", "logger", "paths", "experiment"])
def test_every_option_composes(group):
    assert options(group), f"configs/{group}/ is empty"
    for name in options(group):
        cfg = compose_with(f"{group}={name}")
        assert cfg.sparsity is not None and cfg.paths.results


@pytest.mark.parametrize("name", options("method"))
def test_method_configs_build_their_registered_method(name):
    key, method = method_from_config(compose_with(f"method={name}").method)
    assert key == name and isinstance(method, PruningMethod) and method.name == name  # one key everywhere


def test_every_registered_method_has_a_config():
    assert sorted(registered_methods()) == sorted(options("method"))


@pytest.mark.parametrize("name", options("pipeline"))
def test_pipeline_configs_are_valid_specs(name):
    spec = PipelineSpec.from_config(compose_with(f"pipeline={name}").pipeline)
    assert spec.name == name


def test_metrics_select_together():
    cfg = compose_with("eval=[fid,clip,dreamsim,geneval,cost]")
    assert set(cfg.eval) == {"fid", "clip", "dreamsim", "geneval", "cost"}


def test_canonical_command_defaults():
    cfg = compose_with("sparsity=0.419")
    assert cfg.pipeline.name == "pixart_sigma" and cfg.method.name == "skrr"
    assert cfg.method.beam_width == 3 and cfg.calib.metric == "mse" and cfg.calib.use_projection
