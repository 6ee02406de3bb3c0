"""What the model libraries print, for one block, never for the process.

Loading a model makes transformers and diffusers log notes (unused weights, deprecated
pipelines) and draw one progress bar per file, which would drown HAVIR's own progress. HAVIR
lowers their verbosity only while it loads (:func:`quiet_model_libraries`), and puts back
whatever the user or another library had set: ``import havir`` or a call into it never changes
how transformers and diffusers log. A ``havir`` command holds the libraries' log records and
warnings back until it knows how it ended (:func:`holding_library_messages`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Libraries whose log records and warnings a command holds back.
LIBRARY_LOGGERS = ("transformers", "diffusers", "nibabel", "h5py", "accelerate", "huggingface_hub")

#: Loggers to which the libraries attach their own stderr handler, on import (nibabel's
#: "nibabel.global", huggingface_hub) or on first use (diffusers, transformers).
_OWN_HANDLER_LOGGERS = (*LIBRARY_LOGGERS, "nibabel.global")


@contextmanager
def holding_library_messages(held: list[str]) -> Iterator[None]:
    """Hold the libraries' log records and the Python warnings raised within the block, as
    lines (``"warning (diffusers.models): ..."``) appended to ``held``.

    The libraries need not be imported yet, and are not imported here (diffusers and
    transformers take seconds, which a command given a missing file should not wait for): a
    stderr handler a library attaches while the block runs waits until the block ends, when
    every logger gets its handlers back. Only these loggers, only for the block, are redirected:
    nothing is silenced for the process.
    """

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(f"{record.levelname.lower()} ({record.name}): {record.getMessage()}")

    existing = {name for name in logging.root.manager.loggerDict if name.split(".")[0] in LIBRARY_LOGGERS}
    saved = {}
    for name in sorted(existing | set(_OWN_HANDLER_LOGGERS)):
        logger = logging.getLogger(name)  # made now if its library is not imported yet
        saved[name] = logger.handlers[:]
        logger.handlers[:] = [Hold()] if name in LIBRARY_LOGGERS else []  # children reach their library's Hold
        logger.addHandler = saved[name].append  # a library's own handler, added now, comes into play at the end
    try:
        with warnings.catch_warnings(record=True) as caught:  # the process's filters still apply
            try:
                yield
            finally:
                held.extend(f"warning ({w.category.__name__}): {w.message}" for w in caught)
    finally:
        for name, handlers in saved.items():
            logger = logging.getLogger(name)
            del logger.addHandler
            logger.handlers[:] = handlers


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
