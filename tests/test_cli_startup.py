"""A command given a missing input says so before importing torch and the model libraries
(issue 18: `features --data /nonexistent` took 9 s to answer), and the libraries' own messages
are still held back when they are imported later, by the command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

#: Each command with a missing input (or a bad option, said first), and the start of its one error line.
MISSING_INPUTS = {
    "features": (["features", "--data", "{nowhere}", "--subject", "1"], "error: no prepared data for subj01"),
    "train": (["train", "--data", "{nowhere}", "--subject", "1", "--out", "{scratch}/run"], "error: no prepared data for subj01"),
    "train without features": (["train", "--data", "{prepared}", "--subject", "1", "--out", "{scratch}/run"],
                               "error: no features for subj01"),
    "reconstruct": (["reconstruct", "--run", "{nowhere}", "--out", "{scratch}/recon"], "error: {nowhere} holds no finished training run"),
    "eval": (["eval", "--recon", "{nowhere}", "--data", "{nowhere}", "--subject", "1"], "error: no prepared data for subj01"),
    "eval without reconstructions": (["eval", "--recon", "{nowhere}", "--data", "{prepared}", "--subject", "1"],
                                     "error: reconstruction folder {nowhere} does not exist"),
    "reconstruct, bad option": (["reconstruct", "--run", "{nowhere}", "--out", "{scratch}/recon", "--steps", "0"],
                                "error: --steps must be a whole number in [1, 1000], got 0"),
    "features, bad device": (["features", "--data", "{nowhere}", "--subject", "1", "--device", "gpu0"],
                             "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
    "prepare": (["prepare", "--nsd-root", "{nowhere}", "--subject", "1", "--out", "{scratch}/data"], "error: NSD root {nowhere} does not exist"),
    "table": (["table", "{nowhere}"], "error: {nowhere} does not exist"),
}

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "h5py", "nibabel", "skimage")


def test_a_missing_input_is_refused_before_the_heavy_imports(tmp_path):
    """In one fresh process, each command in turn: its one error line and exit status 2, and not
    one of the heavy libraries imported (the old CLI imported diffusers and transformers first)."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "subj01.h5").write_bytes(b"")  # only its presence is checked before the imports
    where = {"nowhere": str(tmp_path / "nowhere"), "scratch": str(tmp_path), "prepared": str(prepared)}
    commands = {name: [arg.format(**where) for arg in args] for name, (args, _) in MISSING_INPUTS.items()}
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from havir.cli import main

        results = {}
        for name, args in json.loads(sys.argv[1]).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    main(args)
                except SystemExit as exit:
                    status = exit.code
            imported = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
            results[name] = {"status": status, "stderr": err.getvalue(), "imported": imported}
        print(json.dumps(results))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands), json.dumps(HEAVY)],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name, (_, start) in MISSING_INPUTS.items():
        result = results[name]
        lines = result["stderr"].strip().splitlines()
        assert result["status"] == 2 and len(lines) == 1 and lines[0].startswith(start.format(**where)), (name, result)
        assert result["imported"] == [], f"havir {name}: imported {result['imported']} before refusing a missing input"


def test_library_handlers_attached_during_a_command_wait_for_its_end():
    """huggingface_hub and nibabel attach a stderr handler when imported; imported by the command
    (as the stages import them), their log lines are still held: dropped after a user error,
    printed after a success, and each library has its handler back at the end."""
    script = textwrap.dedent(
        """
        import logging, sys, types
        from havir.cli import main
        from havir.errors import InvalidInputError

        failing = [True]

        def fake_table(evals, method=None):
            import nibabel  # noqa: F401 (attaches its own stderr handler on import)
            from huggingface_hub.utils import logging as hub_logging  # attaches its own on import

            hub_logging.get_logger("huggingface_hub.file_download").warning("a note from the hub")
            logging.getLogger("nibabel.global").warning("a note from nibabel")
            if failing[0]:
                raise InvalidInputError("bad input")
            return types.SimpleNamespace(to_json=dict)

        # `havir table` imports its stage when it runs: here a stand-in that imports the libraries.
        sys.modules["havir.metrics.table"] = types.SimpleNamespace(subject_table=fake_table, render=None, table_rows=None)
        assert "huggingface_hub" not in sys.modules and "nibabel" not in sys.modules
        for fail in (True, False):
            failing[0] = fail
            try:
                main(["table", "eval.json", "--json"])
            except SystemExit as exit:
                print(f"status {exit.code}", file=sys.stderr)
        # The libraries' own handlers are back: a note logged now is printed by them.
        logging.getLogger("huggingface_hub").warning("after the command")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "error: bad input",
        "status 2",
        "warning (huggingface_hub.file_download): a note from the hub",
        "warning (nibabel.global): a note from nibabel",
        "status 0",
        "after the command",
    ]
