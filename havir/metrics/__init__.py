"""Evaluation with the field's protocol (``eval-protocol.md``): scores, networks, and ``havir eval``.

- :mod:`havir.metrics.scores`: PixCorr, SSIM, two-way identification, correlation distance and
  bootstrap intervals, per image.
- :mod:`havir.metrics.protocols`: the protocol presets (``mindeye2``, ``brain-diffuser``) as
  frozen records, and the image steps they name.
- :mod:`havir.metrics.networks`: the protocol's feature networks, their weights and layers.
- :mod:`havir.metrics.evaluate`: scoring a folder of ``<nsdId>.png`` against a subject's test
  images, and the result files.
- :mod:`havir.metrics.table`: several subjects' results averaged into the published-style row.
- :mod:`havir.metrics.standin`: EfficientNet-Lite0, the offline stand-in network of the demo.
"""
