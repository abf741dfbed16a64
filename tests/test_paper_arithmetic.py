"""The paper's parameter counts and sparsity levels follow from architecture configs (meta device, no weights)."""
import importlib.util
from pathlib import Path

from skrr import count_params, units
from skrr.architectures import t5_xxl_encoder


def test_t5_xxl_units_match_spec_table():
    enc = t5_xxl_encoder()
    sizes = units(enc)
    assert count_params(enc) == 4_762_310_656
    assert len(sizes) == 48 and {u.params for u in sizes[0::2]} == {67_112_960} and {u.params for u in sizes[1::2]} == {125_833_216}


def test_paper_arithmetic_script_checks_every_number(capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "paper_arithmetic.py"
    spec = importlib.util.spec_from_file_location("paper_arithmetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "41.92 %" in out and "5,422,656,951" in out
