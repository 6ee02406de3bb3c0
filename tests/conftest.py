"""Shared fixtures: synthetic NSD releases written once per test session."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

# One CPU thread for torch and BLAS unless the caller chose (read when torch and numpy load, so
# set before they are imported): the suite's tiny models gain nothing from more, and on a busy
# machine oversubscribed threads made it 15x slower (issue 18).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from havir.cli import main
from havir.nsd.synth import synthesize_nsd


@pytest.fixture(scope="session")
def two_subject_nsd(tmp_path_factory):
    """Subjects 1 and 4: different grids, 4 and 3 sessions, NIfTI and HDF5 betas."""
    root = tmp_path_factory.mktemp("nsd2")
    truth = synthesize_nsd(root, subjects=(1, 4), images=200, seed=7)
    return root, truth


@pytest.fixture(scope="session")
def _small_nsd(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd_small")
    truth = synthesize_nsd(root, subjects=(1,), images=40, seed=3, sessions=2)
    return root, truth


@pytest.fixture
def small_nsd(_small_nsd, tmp_path):
    """A private copy of a small one-subject release, for tests that damage it."""
    source, truth = _small_nsd
    root = tmp_path / "nsd"
    shutil.copytree(source, root)
    return root, truth


@pytest.fixture
def without_isal(monkeypatch):
    """As if python-isal were not installed: importing it fails (NIfTI betas fall back to zlib)."""
    monkeypatch.setitem(sys.modules, "isal", None)


@pytest.fixture
def run_cli(capsys):
    """Run ``havir`` in-process; returns (exit status, stdout, stderr)."""

    def run(*args: str):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


#: A plain progress line (stderr not a terminal), e.g. "22:31:05 training: 6/20 epochs (30%), 1.2 epochs/s, ETA 12s".
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<what>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<percent>\d+)%\), [\d.e+]+ \w+/s")


#: A stage line of ``havir demo``, e.g. "[3/12] preparing subject 1 (mask, normalise, split)  (5 s)".
DEMO_STAGE_LINE = re.compile(r"^\[\d+/\d+\] .+  \(\d+ s\)$")


def without_progress(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not progress lines (a user error is one line, after any
    progress made before the error was found)."""
    return [line for line in stderr.strip().splitlines() if not (PROGRESS_LINE.match(line) or DEMO_STAGE_LINE.match(line))]


def json_of(stdout: str) -> dict:
    """The one JSON object a ``--json`` command prints."""
    return json.loads(stdout)


@pytest.fixture(scope="session")
def trainable(two_subject_nsd, tmp_path_factory):
    """Subject 1 of the two-subject release, prepared and with ``tiny`` features: (data folder, truth)."""
    from havir.features import compute_features
    from havir.prepare import prepare_subject

    root, truth = two_subject_nsd
    data = tmp_path_factory.mktemp("trainable")
    prepare_subject(root, 1, data, progress=False)
    compute_features(data, 1, model="tiny", progress=False)
    return data, truth


@pytest.fixture
def interrupt_on_call(monkeypatch):
    """``arm(module, name, n)`` makes ``module.name`` raise KeyboardInterrupt (a user's Ctrl-C)
    on its n-th call; it returns a function that puts the original back."""

    def arm(module, name: str, n: int):
        original, calls = getattr(module, name), {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, interrupted)
        return lambda: monkeypatch.setattr(module, name, original)

    return arm
