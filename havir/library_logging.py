"""Quiet the model libraries for one block, never for the process.

Loading a model makes transformers and diffusers log notes (unused weights, deprecated
pipelines) and draw one progress bar per file, which would drown HAVIR's own progress. HAVIR
lowers their verbosity only while it loads, and puts back whatever the user or another library
had set: ``import havir`` or a call into it never changes how transformers and diffusers log.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_model_libraries() -> Iterator[None]:
    """Within the block, transformers and diffusers log errors only and draw no progress bars;
    their previous verbosity and progress-bar setting come back afterwards, also after an error.

    Usable as a decorator (``@quiet_model_libraries()``) on a loading function.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, (verbosity, bars) in zip(libraries, saved):
            library.set_verbosity(verbosity)
            (library.enable_progress_bar if bars else library.disable_progress_bar)()
