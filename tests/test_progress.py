"""Progress on stderr: plain lines at a steady cadence when stderr is not a terminal (a batch
job's log file), a bar with a status on a terminal (issue 18)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import havir.progress
from havir.progress import progress_report, track
from tests.conftest import PROGRESS_LINE as LINE



def test_plain_lines_every_tenth_with_rate_eta_and_status(capsys):
    with progress_report("training", 20, unit="epochs") as report:
        for epoch in range(20):
            report.advance(status=f"loss {epoch}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10  # 10%, 20%, ... 100%
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m["done"]) for m in matches] == list(range(2, 21, 2))
    assert lines[0].endswith("; loss 1") and "ETA" in lines[0]  # the status of the step just done
    assert "ETA" not in lines[-1] and matches[-1]["percent"] == "100"


def test_plain_lines_every_30_seconds_of_slow_work(capsys, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(havir.progress.time, "monotonic", lambda: clock["now"])
    with progress_report("reading", 1000, unit="sessions") as report:  # one step is 0.1%
        for _ in range(5):
            clock["now"] += 31  # each step is slower than the 30 s cadence
            report.advance()
        clock["now"] += 1
        report.advance()  # 1 s after the last line, far from the next tenth: no line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5
    assert "5/1000 sessions (0%), 0.0323 sessions/s, ETA 8h34m" in lines[-1]


def test_disabled_progress_prints_nothing(capsys):
    assert list(track(range(5), "nothing", enabled=False)) == list(range(5))
    with progress_report("nothing", 3, enabled=False) as report:
        report.advance(3, status="x")
    assert capsys.readouterr().err == ""


def test_the_terminal_bar_shows_the_status(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(havir.progress, "stderr_console", Console(file=screen, force_terminal=True, width=200))
    assert list(track(range(3), "training", unit="epochs", status=lambda: "loss structural 0.125")) == [0, 1, 2]
    assert "loss structural 0.125" in screen.getvalue() and "3/3" in screen.getvalue()


def test_prepare_writes_progress_lines_into_a_redirected_stderr(_small_nsd, tmp_path):
    """As a batch scheduler runs it: stderr is a file, not a terminal."""
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "job.err"
    with open(log, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "havir", "prepare", "--nsd-root", _small_nsd[0], "--subject", "1", "--out", tmp_path / "data", "--json"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
            env=os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 0, log.read_text()
    lines = [m for m in map(LINE.match, log.read_text().splitlines()) if m]
    assert [(m["what"], m["done"], m["total"]) for m in lines] == [("subj01: reading sessions", "1", "2"), ("subj01: reading sessions", "2", "2")]
