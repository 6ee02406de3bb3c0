"""The files that pass from one stage to the next, one module each.

Every module owns one on-disk artifact: where it lives, its format version and checks, and how
it is read (the stage that makes it writes it with these names). Stages import artifacts, never
each other (``make test`` checks this with import-linter, see ``pyproject.toml``).

* :mod:`havir.artifacts.prepared`: ``DATA/subjXX.h5`` + ``subjXX.json``, written by ``havir prepare``;
* :mod:`havir.artifacts.features_cache`: ``DATA/subjXX_features.h5``, written by ``havir features``;
* :mod:`havir.artifacts.dataset`: the prepared data joined with its features, as ``train`` and
  ``reconstruct`` read them;
* :mod:`havir.artifacts.run`: a run folder (decoders, ``run.json``, ``summary.json``), written by ``havir train``;
* :mod:`havir.artifacts.reconstruction`: a folder of ``<nsdId>.png``, written by ``havir reconstruct``
  (or any method), read by ``havir eval``.
"""
