"""Atomic writes: an interrupted write (exception or SIGKILL) never leaves a file that looks valid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finegates.data.files import atomic_write, write_json

SLOW_WRITER = """
import sys, time
from pathlib import Path
from finegates.data.files import atomic_write

def write(tmp):
    with open(tmp, "w") as f:
        f.write('{"half": ')
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here
        f.write('1}')

atomic_write(Path(sys.argv[1]), write)
"""


def test_exception_mid_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": 1})

    def broken(tmp: str) -> None:
        Path(tmp).write_text('{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_sigkill_mid_write_leaves_no_file_under_the_real_name(tmp_path):
    target = tmp_path / "out" / "result.json"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # half the file is on disk now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()  # nothing that looks like a finished result
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".result.json.") and leftovers[0].suffix == ".tmp"


def test_a_new_run_clears_temporaries_of_a_killed_one(tmp_path):
    """The loop's run-directory start removes the hidden temporaries a killed writer left."""
    from finegates.training.loop import _prepare_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / ".metrics.json.abc.tmp").write_text("{")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / ".state.pt.xyz.tmp").write_bytes(b"\0")
    _prepare_run_dir(out, None, {"format_version": 1})
    assert sorted(p.name for p in out.rglob("*")) == ["config.json"]
