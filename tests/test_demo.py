"""`make demo` without its data says so in one line (no traceback, nothing trained)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import finegates


def test_demo_without_mrpc_fails_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "finegates.demo", "--data-dir", str(tmp_path / "none"),
                          "--out", str(tmp_path / "demo")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(finegates.__file__).parents[1])})
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no MRPC at") and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
