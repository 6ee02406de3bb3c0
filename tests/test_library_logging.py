"""HAVIR quiets transformers and diffusers only while it loads models (issue 15, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from havir.library_logging import quiet_model_libraries

ROOT = Path(__file__).resolve().parents[1]


def test_importing_and_loading_leave_the_libraries_logging_as_it_was():
    """In a fresh process (imports happen once): the user's verbosity and progress-bar choice survive."""
    script = textwrap.dedent(
        """
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_info()
        transformers_logging.set_verbosity_debug()
        transformers_logging.enable_progress_bar()
        diffusers_logging.disable_progress_bar()

        import havir.cli, havir.features, havir.reconstruct, havir.train  # noqa: E401, F401
        from havir.models.versatile import load_versatile_diffusion

        load_versatile_diffusion("tiny")
        print(diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
              diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20", "10", "False", "True"]


def test_quiet_block_restores_the_previous_settings_after_an_error():
    before = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
              diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    try:
        diffusers_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_info()
        transformers_logging.enable_progress_bar()
        with pytest.raises(KeyError), quiet_model_libraries():
            assert diffusers_logging.get_verbosity() == transformers_logging.get_verbosity() == 40  # errors only
            assert not transformers_logging.is_progress_bar_enabled()
            raise KeyError("a failed load")
        assert (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()) == (30, 20)
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])
        (diffusers_logging.enable_progress_bar if before[2] else diffusers_logging.disable_progress_bar)()
        (transformers_logging.enable_progress_bar if before[3] else transformers_logging.disable_progress_bar)()
