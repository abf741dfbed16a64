"""skrr.io: atomic writes leave whole files with the mode open() would give them (not mkstemp's 0600)."""
import os
import stat

import pytest

from skrr.io import atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_results_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "a" / "cell.json", {"x": 1})
    atomic_write_bytes(tmp_path / "a" / "cell.json", b"{}\n")  # replacing keeps the mode too
    assert stat.S_IMODE((tmp_path / "a" / "cell.json").stat().st_mode) == mode
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["cell.json"]  # no temporary file left
