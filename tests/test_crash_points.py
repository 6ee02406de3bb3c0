"""Crash points: each long command is stopped at many points, run again, and must end with the
outputs of an uninterrupted run (bit for bit) and no temporary file left.

Two ways to stop a command:

* ``prepare`` (quick to import) is killed for real: a subprocess SIGKILLs itself right after its
  k-th HDF5 write reached the file, for k spread over all its writes. Nothing is flushed or
  closed, as after ``kill -9`` or a power cut of the process (the OS keeps what was written).
* The torch commands (``features``, ``train``, ``reconstruct``, ``eval``) would take seconds per
  subprocess just to import: there a failure is injected in-process at the k-th commit
  (:func:`havir.io.commit`, the one rename every output goes through) or at the k-th step of
  the work, which unwinds the stack like a Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import havir.io
from havir.io import LOCK_NAME, REPLACED_PREFIX, TEMPORARY_PREFIX
from havir.prepare import prepare_subject

ROOT = Path(__file__).resolve().parents[1]

_KILL_AT_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import h5py
    from havir.prepare import prepare_subject

    kill_at, calls = int(sys.argv[3]), [0]
    write = h5py.Dataset.__setitem__

    def write_then_maybe_die(self, key, value):
        write(self, key, value)
        calls[0] += 1
        if calls[0] == kill_at:
            self.flush()  # this write reached the file; the rest of HDF5's state did not
            os.kill(os.getpid(), signal.SIGKILL)

    h5py.Dataset.__setitem__ = write_then_maybe_die
    prepare_subject(sys.argv[1], 1, sys.argv[2], progress=False)
    print(calls[0])
    """
)


def _prepare_in_subprocess(root: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _KILL_AT_WRITE, str(root), str(out), str(kill_at)],
        capture_output=True, text=True, env=environment, timeout=120,
    )


def assert_same_hdf5(expected: Path, actual: Path) -> None:
    """Every dataset and attribute of two HDF5 files equal, bit for bit."""
    with h5py.File(expected) as a, h5py.File(actual) as b:
        names: list[str] = []
        a.visit(names.append)
        seen: list[str] = []
        b.visit(seen.append)
        assert sorted(seen) == sorted(names)
        for name in names:
            if isinstance(a[name], h5py.Dataset):
                np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            assert dict(a[name].attrs) == dict(b[name].attrs), name
        assert dict(a.attrs) == dict(b.attrs)


def assert_no_temporaries(folder: Path) -> None:
    left = [p for p in Path(folder).rglob("*")
            if p.name.startswith((TEMPORARY_PREFIX, REPLACED_PREFIX, ".havir-write-test")) or p.name == LOCK_NAME
            or p.name.endswith(".partial")]
    assert not left, f"temporary files left behind: {left}"


def test_prepare_killed_at_any_write_resumes_to_identical_arrays(small_nsd, tmp_path):
    """Issue 12, item 1: a kill between streaming and normalising z-scored the data twice."""
    root, _ = small_nsd
    whole = tmp_path / "whole"
    finished = _prepare_in_subprocess(root, whole, kill_at=0)
    assert finished.returncode == 0, finished.stderr
    n_writes = int(finished.stdout.split()[-1])
    assert n_writes >= 12
    kill_points = sorted({1, n_writes // 3, n_writes // 2, n_writes - 4, n_writes - 2, n_writes})
    for kill_at in kill_points:
        out = tmp_path / f"killed-{kill_at}"
        killed = _prepare_in_subprocess(root, out, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        prepare_subject(root, 1, out, progress=False)
        assert_same_hdf5(whole / "subj01.h5", out / "subj01.h5")
        with h5py.File(out / "subj01.h5") as h5:
            assert abs(h5["train/structural"][()].std(axis=0).mean() - 1) < 1e-3, f"z-scored twice (kill at {kill_at})"
        assert json.loads((out / "subj01.json").read_text())["train_trials"] > 0
        assert_no_temporaries(out)
