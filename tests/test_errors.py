"""User errors against bugs (issue 15, item 5): only :class:`~havir.errors.HavirError` is one line
and exit status 2; anything else keeps its traceback and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from havir.cli import BUG_REPORT
from havir.devices import smaller_batch_on_oom
from havir.errors import BatchTooLargeError, HavirError

ROOT = Path(__file__).resolve().parents[1]


def test_an_injected_bug_exits_1_with_its_traceback(tmp_path):
    """A TypeError inside a stage (here the synthetic release's writer) is a bug, not bad input."""
    script = textwrap.dedent(
        """
        import sys
        import havir.nsd.synth

        def broken(*args, **kwargs):
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

        havir.nsd.synth.synthesize_nsd = broken
        from havir.cli import main

        main(["synth-nsd", sys.argv[1], "--json"])
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "nsd")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "in broken" in done.stderr
    assert "TypeError: unsupported operand" in done.stderr and "error: " not in done.stderr
    assert done.stderr.rstrip().endswith(BUG_REPORT)


def test_a_bug_in_a_stage_is_not_turned_into_a_user_error(trainable, tmp_path, monkeypatch):
    import havir.train

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (64,3) (65,3)")

    monkeypatch.setattr(havir.train, "fit_decoders", broken)
    data, _ = trainable
    from havir.cli import main

    with pytest.raises(ValueError, match="could not be broadcast") as raised:
        main(["train", "--data", str(data), "--subject", "1", "--out", str(tmp_path / "run"), "--json"])
    assert not isinstance(raised.value, HavirError) and BUG_REPORT in raised.value.__notes__


def test_a_bad_config_leaves_no_run_and_the_corrected_rerun_succeeds(trainable, tmp_path, run_cli):
    data, _ = trainable
    config, run = tmp_path / "config.toml", tmp_path / "run"
    args = ("train", "--data", data, "--subject", 1, "--out", run, "--config", config, "--json")
    for bad, named in (('epochs = "forty"', "epochs"), ("val_fraction = 7.0", "val_fraction"), ("batch_size = 0", "batch_size")):
        config.write_text(f'preset = "tiny"\n{bad}\n')
        status, stdout, stderr = run_cli(*args)
        assert status == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert named in stderr and "Traceback" not in stderr and stdout == ""
        assert not run.exists()
    config.write_text('preset = "tiny"\nepochs = 1\nbatch_size = 64\n')
    status, _, stderr = run_cli(*args)
    assert status == 0, stderr
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize("raised", [MemoryError("cannot allocate"), RuntimeError], ids=["host", "other"])
def test_out_of_memory_names_half_the_batch(raised):
    import torch

    if raised is RuntimeError:  # torch's CUDA out-of-memory error, raised without a GPU
        raised = torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(BatchTooLargeError, match=r"at batch size 5: try batch_size = 2 in the TOML$") as caught:
        with smaller_batch_on_oom(5, "batch_size = {} in the TOML"):
            raise raised
    assert isinstance(caught.value, MemoryError) and caught.value.__cause__ is raised
    with pytest.raises(BatchTooLargeError, match="at batch size 1: try --batch-size 1$"):
        with smaller_batch_on_oom(1):
            raise MemoryError
    with pytest.raises(BatchTooLargeError, match="at batch size 8:"):  # the inner block's advice is kept
        with smaller_batch_on_oom(4), smaller_batch_on_oom(8):
            raise MemoryError
