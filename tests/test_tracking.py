"""W&B mirror: off means nothing at all; offline writes under <results>/wandb with a deterministic run id."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from skrr.plan import EncoderSignature, PruningPlan, Slot
from skrr.experiments.store import Cell, CellStore
from skrr.experiments.tracking import Tracker, log_table, metric_name, resolve_mode, run_id

CELL = Cell("tiny", "skrr", 0.419, 0, "k1")
ON = {"enabled": True, "project": "skrr-test", "entity": None, "mode": None}


@pytest.fixture
def no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key anywhere: no WANDB_API_KEY and a HOME without ~/.netrc."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def plan() -> PruningPlan:
    """Skip units 0 and 3 of a 2-block encoder, then re-use unit 1 (an FFN) at position 3."""
    enc = EncoderSignature(model_id="tiny-t5", revision=None, family="t5", arch="t5-2", num_blocks=2)
    skipped = PruningPlan.from_skips(enc, [0, 3], "unit", "skrr", {"target_sparsity": 0.419, "order": [3, 0, 1]})
    return skipped.with_slots({3: Slot(1, "ffn")}, realized_sparsity=0.42, prefix=2)


def test_disabled_creates_nothing_and_never_imports_wandb(tmp_path: Path) -> None:
    code = f"""
import sys
from skrr.experiments.store import Cell
from skrr.experiments.tracking import Tracker
t = Tracker({{"enabled": False, "mode": "online"}}, Cell("tiny", "skrr", 0.3), "sig", "g", {{}}, results=r"{tmp_path}")
t.log_config({{"a": 1}}); t.log_metrics({{"clip": 0.3}}); t.log_images(["x.png"], ["p"]); t.finish()
assert not t.enabled and t.mode == "disabled"
assert "wandb" not in sys.modules, "wandb was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert list(tmp_path.iterdir()) == []


def test_mode_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_key: None) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode({"enabled": False, "mode": "online"}) == "disabled"
    assert resolve_mode(ON) == "offline"                                   # no key -> offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(ON) == "online"
    assert resolve_mode({**ON, "mode": "offline"}) == "offline"           # config forces
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(ON) == "disabled"                                 # env decides when config does not
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert resolve_mode(ON) == "online"
    with pytest.raises(ValueError, match="logger.mode='sometimes'"):
        resolve_mode({**ON, "mode": "sometimes"})


def test_run_id_is_deterministic() -> None:
    assert run_id(CELL, "abc", "beam") == run_id(Cell("tiny", "skrr", 0.419, 0, "k1"), "abc", "beam")
    assert run_id(CELL, "abc", "beam") != run_id(CELL, "abd", "beam")
    assert run_id(CELL, "abc", "beam") != run_id(Cell("tiny", "skrr", 0.419, 1, "k1"), "abc", "beam")
    assert run_id(CELL, "abc", "beam") != run_id(CELL, "abc", "table1")
    assert re.fullmatch(r"[0-9a-f]{16}", run_id(CELL, "abc"))


def test_offline_run_under_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_key: None) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = tmp_path / "results"
    img = tmp_path / "sample.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    config = OmegaConf.create({"sparsity": 0.419, "method": {"beam_width": 1}, "root": "${hydra:runtime.cwd}"})
    with Tracker(ON, CELL, "sig123", group="beam", config=config, results=results) as t:
        assert t.enabled and t.mode == "offline" and t.id == run_id(CELL, "sig123", "beam")
        t.log_config({"extra": 1})
        t.log_plan(plan())
        t.log_plan(plan().with_meta(realized_sparsity=0.3), "plan_clip_l")  # an encoders= cell's other plan
        t.log_metrics({"clip": {"value": 0.31, "backbone": "x"}, "geneval": {"tasks": {"counting": 0.4}}})
        t.log_images([img], ["a red square"])
        summary = dict(t.run.summary)
        assert t.run.config["method"] == {"beam_width": 1} and t.run.config["extra"] == 1
    assert summary["realized_sparsity"] == 0.42 and summary["plan/order"] == "3,0,1"
    assert summary["plan/skipped"] == "0,3" and summary["plan/reused"] == "3->1"
    assert summary["plan_clip_l/realized_sparsity"] == 0.3 and summary["plan_clip_l/skipped"] == "0,3"
    assert summary["metrics/geneval/tasks/counting"] == 0.4 and summary["metrics/clip/value"] == 0.31
    runs = list((results / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[-1] for r in runs] == [t.id]
    assert list(runs[0].glob("*.wandb"))
    # Same cell and signature again (a resumed cell): the same run id.
    with Tracker(ON, CELL, "sig123", group="beam", config=config, results=results) as again:
        assert again.id == t.id
    assert {r.name.rsplit("-", 1)[-1] for r in (results / "wandb").glob("offline-run-*")} == {t.id}


def test_wandb_failure_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_key: None,
                                    caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    def broken(**kwargs: object) -> None:
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = Tracker(ON, CELL, "sig", results=tmp_path)
    assert not t.enabled and "W&B disabled" in caplog.text and "no service" in caplog.text
    t.log_metrics({"clip": 0.3})
    t.finish()


def test_a_stand_in_backbone_renames_the_metric_and_the_label_goes_to_the_summary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_key: None) -> None:
    from eval.backbones import EFFNET_FID_NAME, TINY_CLIP_NAME

    assert metric_name("fid", EFFNET_FID_NAME) == "stand_in/fid@efficientnet-lite0"
    assert metric_name("clip", TINY_CLIP_NAME) == "stand_in/clip@tiny-random-clip"
    assert metric_name("clip", "openai/clip-vit-base-patch32") == "metrics/clip" == metric_name("clip", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(ON, CELL, "sig", group="demo", results=tmp_path) as t:
        t.log_metrics({"fid": 3.5, "clip": 0.31}, backbones={"fid": EFFNET_FID_NAME,
                                                             "clip": "openai/clip-vit-base-patch32"})
        summary = dict(t.run.summary)
    assert summary["stand_in/fid@efficientnet-lite0"] == 3.5 and "metrics/fid" not in summary
    assert summary["stand_in/fid@efficientnet-lite0/backbone"] == EFFNET_FID_NAME
    assert summary["metrics/clip"] == 0.31 and summary["metrics/clip/backbone"] == "openai/clip-vit-base-patch32"


def test_log_table_writes_a_wandb_table_run_and_is_off_when_logging_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_key: None) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_table(ON, "demo", "demo", ["row", "ours"], [["Dense", "1.0"]], results=tmp_path) is None
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    rid = log_table(ON, "demo", "demo", ["row", "ours", "backbone"], [["Dense", "1.0", "x (NOT y)"]],
                    ["^a stand-in"], results=tmp_path)
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{rid}"))
    assert rid and len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert log_table(ON, "demo", "demo", ["row"], [["Dense"]], results=tmp_path) == rid  # rebuilt: same run


def test_log_table_logs_every_row_with_its_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    no_key: None) -> None:
    import types

    import wandb

    logged: dict = {}
    fake = types.SimpleNamespace(log=logged.update, summary={}, finish=lambda: None)
    monkeypatch.setattr(wandb, "init", lambda **kw: logged.setdefault("init", kw) and fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [["Dense", "1.0", "x (NOT y)"], ["Skrr", "0.9", "x (NOT y)"]]
    log_table(ON, "demo", "demo", ["row", "ours", "backbone"], rows, ["^a stand-in"], results=tmp_path)
    table = logged["table/demo"]
    assert isinstance(table, wandb.Table) and table.columns == ["row", "ours", "backbone"] and table.data == rows
    assert logged["init"]["job_type"] == "table" and fake.summary["table/demo/notes"] == "^a stand-in"


def test_score_stage_hands_each_metric_files_backbone_to_the_tracker(tmp_path: Path) -> None:
    # W&B names a stand-in's metric by its backbone: the stage must pass the label of each file it read.
    from eval.score import metric_specs
    from skrr.experiments import stages
    from skrr.experiments.results import CONFIG_DIR, compose_configs
    from skrr.io import atomic_write_json

    (cfg,) = compose_configs(CONFIG_DIR, ["eval=offline", "pipeline=tiny"])
    store = CellStore(tmp_path, Cell("tiny", "skrr", 0.3), {}).open()
    keys = list(metric_specs(cfg.eval))
    for i, key in enumerate(keys):
        atomic_write_json(store.metric_path(key), {"value": float(i), "backbone": f"backbone-of-{key}"})
    calls = []

    class Recorder:
        def log_metrics(self, values, backbones=None):
            calls.append((values, backbones))

    values = stages.score(cfg, store, pipe=None, device="cpu", tracker=Recorder())
    assert values == {key: float(i) for i, key in enumerate(keys)}
    assert calls == [(values, {key: f"backbone-of-{key}" for key in keys})]
