"""Named kill points (verl_grto/faults.py): inert unless named, and then a marker and a process that stops there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verl_grto import faults

REPO = Path(__file__).resolve().parents[1]


def test_kill_point_is_a_no_op_unless_named(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.KILL_AT_ENV, raising=False)
    monkeypatch.setenv(faults.MARKER_ENV, str(tmp_path / "m.json"))
    faults.kill_point("a")  # returns
    monkeypatch.setenv(faults.KILL_AT_ENV, "b")
    faults.kill_point("a")  # another point: returns
    monkeypatch.setenv(faults.KILL_AT_ENV, "a#3")
    faults.kill_point("a")
    faults.kill_point("a")  # the 1st and 2nd hits of a#3: return
    assert not (tmp_path / "m.json").exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:  # importing verl: slow
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_named_point_writes_the_marker_and_blocks_until_killed(tmp_path):
    marker = tmp_path / "m.json"
    code = (
        "import sys; from verl_grto.faults import kill_point\n"
        "for i in range(3):\n    kill_point('p'); print('passed', i, flush=True)\n"
    )
    env = {**os.environ, faults.KILL_AT_ENV: "p#2", faults.MARKER_ENV: str(marker), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, proc)
        assert marker.exists(), "the point was never reached"
        got = json.loads(marker.read_text())
        assert got["point"] == "p" and got["hit"] == 2 and got["pid"] == proc.pid
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)  # blocked at the point, not exited
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
    assert out.split("\n")[:1] == ["passed 0"] and "passed 1" not in out  # stopped at the 2nd hit


def test_dump_after_resume_saves_only_when_asked(monkeypatch, tmp_path):
    saved: list[str] = []
    monkeypatch.delenv(faults.PROBE_ENV, raising=False)
    faults.dump_after_resume("x", saved.append)
    assert saved == []
    monkeypatch.setenv(faults.PROBE_ENV, str(tmp_path))
    faults.dump_after_resume("x", saved.append)
    assert saved == [str(tmp_path / "x")]
