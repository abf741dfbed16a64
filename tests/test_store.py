"""The results store: folder layout, signature refusal, reset on overwrite, corrupt files in one line."""
import pytest

from skrr.experiments.store import Cell, CellStore, StoreError, read_json


def test_layout_and_signature_refusal(tmp_path):
    cell = Cell("tiny", "skrr", 0.419, 0, tag="k1")
    store = CellStore(tmp_path, cell, {"a": 1}).open()
    assert store.dir == tmp_path / "runs/tiny/skrr-k1/s0.419/seed0"
    store.mark_done("search")
    (store.metrics_dir).mkdir()
    store.metric_path("clip").write_text("{}")
    assert store.done("search")
    with pytest.raises(StoreError, match=r"changed: a\); pass overwrite=true"):
        CellStore(tmp_path, cell, {"a": 2}).open()
    CellStore(tmp_path, cell, {"a": 1}).open()  # the same config reopens
    again = CellStore(tmp_path, cell, {"a": 2}).open(overwrite=True)
    assert not again.done("search") and not again.metric_path("clip").exists()


def test_a_folder_without_results_takes_the_new_config(tmp_path):
    cell = Cell("tiny", "skrr", 0.3)
    CellStore(tmp_path, cell, {"a": 1}).open()  # e.g. a run that stopped before its first stage
    assert CellStore(tmp_path, cell, {"a": 2}).open().signature == read_json(
        tmp_path / cell.relpath() / "cell.json")["signature"]


def test_corrupt_cell_file_is_one_line(tmp_path):
    cell = Cell("tiny", "dense", 0.0)
    store = CellStore(tmp_path, cell, {}).open()
    (store.dir / "cell.json").write_text('{"signature": ')
    with pytest.raises(StoreError, match="corrupt.*delete it") as err:
        CellStore(tmp_path, cell, {}).open()
    assert "\n" not in str(err.value)
