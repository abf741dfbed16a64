"""Every method (dense, Skrr and the baselines) returns a valid plan at every sparsity of a sweep,
deterministically, through run.py's own path: Hydra compose -> method_from_config(cfg.method) -> skrr.experiments.search."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from baselines import prune_encoder
from skrr.families import family_of
from skrr.interface import SPARSITY_TOLERANCE
from skrr.pipelines import PipelineSpec, load_text_encoder
from skrr.experiments.methods import method_from_config
from skrr.experiments.search import search_plans
from skrr.surgery import count_params, realized_sparsity, signature

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Tiny pipeline: 6 T5 blocks; one block is 15.4 % of the encoder, one FFN 9.2 %, one attention 6.2 %.
SWEEPS = {"dense": [0.0], "skrr": [0.0, 0.1, 0.25], "shortgpt": [0.0, 0.1, 0.25], "laco": [0.0, 0.1, 0.25],
          "finercut": [0.0, 0.1, 0.25], "magnitude": [0.0, 0.1, 0.25]}


def compose_cell(name):
    """The config run.py would see for ``pipeline=tiny method=<name>``, with a small calibration set."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "pipeline=tiny", f"method={name}", "calib.num_calib_prompts=8", "pipeline.max_sequence_length=16"])


def untimed(meta):
    """Plan meta without wall-clock entries (everything else must repeat exactly)."""
    if isinstance(meta, dict):
        return {k: untimed(v) for k, v in meta.items() if "seconds" not in k}
    return [untimed(v) for v in meta] if isinstance(meta, list) else meta


@pytest.mark.parametrize("name", list(SWEEPS))
def test_every_method_gives_valid_deterministic_plans(name, tmp_path):
    cfg = compose_cell(name)
    spec = PipelineSpec.from_config(cfg.pipeline)
    sparsities = SWEEPS[name]
    runs = []
    for k in range(2):  # two searches from scratch (separate plan caches): same plans
        _, method = method_from_config(cfg.method)
        runs.append(search_plans(cfg, method, name, spec, torch.device("cpu"), sparsities, tmp_path / f"r{k}"))
    encoder, tokenizer = load_text_encoder(spec)
    ids = tokenizer(["a red fox in the snow"], return_tensors="pt").input_ids
    with torch.no_grad():
        dense = encoder(ids).last_hidden_state
    assert sorted(runs[0]) == sorted(round(s, 6) for s in sparsities)
    for s, plan in runs[0].items():
        again = runs[1][s]
        assert plan == again and untimed(plan.meta) == untimed(again.meta), f"{name} at {s} is not deterministic"
        plan.validate(signature(encoder))
        assert plan.granularity in family_of(encoder).granularities
        assert plan.meta["target_sparsity"] == pytest.approx(s)
        realized = plan.meta["realized_sparsity"]
        assert realized >= s - SPARSITY_TOLERANCE
        if name == "magnitude":
            assert plan.is_identity and plan.meta["magnitude"]["num_zeroed"] == round(s * count_params(encoder))
        else:
            assert realized == pytest.approx(realized_sparsity(encoder, plan))
            assert (s == 0) == plan.is_identity
        pruned = prune_encoder(load_text_encoder(spec)[0], plan)  # how the generate stage applies any plan
        with torch.no_grad():
            out = pruned(ids).last_hidden_state
        assert out.shape == dense.shape and torch.isfinite(out).all()
        if s == 0:
            assert torch.equal(out, dense)


def test_plan_cache_is_keyed_without_the_targets(tmp_path):
    """One cached record per method settings: a later sweep with more targets adds them, and the plan at a
    target it already holds is served as is (Skrr's path does not depend on the other targets)."""
    cfg = compose_cell("skrr")
    spec = PipelineSpec.from_config(cfg.pipeline)
    _, method = method_from_config({**cfg.method, "progress": False})
    first = search_plans(cfg, method, "skrr", spec, torch.device("cpu"), [0.1], tmp_path)
    files = sorted((tmp_path / "plans").rglob("*.json"))
    assert len(files) == 1
    both = search_plans(cfg, method, "skrr", spec, torch.device("cpu"), [0.1, 0.25], tmp_path)
    assert sorted((tmp_path / "plans").rglob("*.json")) == files
    assert both[0.1] == first[0.1] and both[0.1].meta == first[0.1].meta  # served from the record
    fresh = search_plans(cfg, method, "skrr", spec, torch.device("cpu"), [0.1, 0.25], tmp_path / "fresh")
    assert fresh[0.1] == first[0.1] and fresh[0.25] == both[0.25]
    assert fresh[0.1].meta["order"] == first[0.1].meta["order"]
    # Other tiny weights (pipeline.seed) are another encoder: their own search, never the seed-0 record.
    reseeded = PipelineSpec.from_config({**cfg.pipeline, "seed": 1})
    search_plans(cfg, method, "skrr", reseeded, torch.device("cpu"), [0.1], tmp_path)
    assert len(list((tmp_path / "plans").rglob("*.json"))) == 2
