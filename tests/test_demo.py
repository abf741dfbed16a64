"""The whole offline demo (`make test-slow`): every cell completes and the table lists every row."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_completes_with_a_full_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), f"results={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "tables" / "demo.md").read_text()
    assert "All cells complete." in table
    for row in ("Dense", "ShortGPT", "LaCo", "Skrr", "Magnitude", "FinerCut (tiny random T5, sub-blocks)",
                "Skrr (tiny SD3: T5 + CLIP-L 30.6 % + CLIP-G 30.3 %)", "Skrr (tiny FLUX, its T5)",
                "Magnitude (tiny SD2: text encoder 47.5 % + U-Net 35 %)"):
        assert f"| {row} |" in table
    assert (tmp_path / "tables" / "demo.png").stat().st_size > 10_000
