"""The demo's front page: the method against a null brain, mode by mode, in numbers and pictures.

One self-contained HTML file (``demo.html``): what is simulated, the warning of the encoder-based
reconstruction literature, a table with each mode's protocol-style numbers and demo measures for
the method and for the null-brain control (the same pipeline trained on shuffled voxel-image
pairs), a few test images of both, and links to each run's full evaluation report.
"""

from __future__ import annotations

import os
from pathlib import Path

from havir.demo_world.measures import BOOTSTRAP, DEMO_MEASURES
from havir.demo_world.probe import DEMO_MEASURE_NOTE
from havir.io import atomic_path
from havir.artifacts.reconstruction import load_reconstructions
from havir.metrics.evaluate import load_ground_truth
from havir.report import _data_uri

#: Shown first on the page.
NULL_WARNING = (
    "A generative model can paint a plausible scene from nothing: a picture that looks like a scene "
    "proves nothing unless it beats the null. The null brain below is the same pipeline trained on "
    "shuffled voxel-image pairs; every number of the method must be read against its row."
)
RUN_TITLES = {"method": "method", "null": "null brain (shuffled pairs)"}
_METRICS = {"pixcorr": "PixCorr", "ssim": "SSIM", "lite0_identification": "Lite0 ident. (stand-in)"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.null td { background: #f4f4f4; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
.warning { background: #fdecea; border-left: 4px solid #c44e52; padding: 0.5em 1em; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 96px; height: 96px; }
"""
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>HAVIR demo: the method against a null brain</title><style>{{ style }}</style></head>
<body>
<h1>HAVIR demo: the method against a null brain</h1>
<p>{{ n }} held-out test images of a simulated subject.</p>
<div class="note">{% for note in notes %}<p>{{ note }}</p>{% endfor %}</div>
<div class="warning"><p>{{ warning }}</p></div>
<h2>Every mode, method and null</h2>
<table><tr><th>run</th><th>mode</th>{% for title in columns.values() %}<th>{{ title }}</th>{% endfor %}</tr>
{% for row in rows %}<tr class="{{ row.run }}"><td>{{ row.run_title }}</td><td>{{ row.mode }}</td>{% for cell in row.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p>Means with 95% bootstrap intervals over test images ({{ resamples }} resamples of the images; for the
demo's identification each resample's reconstructions are scored against its own drawn images only).
Chance: identification 50%, content accuracy 25%.
{{ measure_note }} Mini-CLIP identification is one too: two-way identification with the demo's
miniature CLIP, trained on the same scenes.</p>
<h2>Does fusion add the semantic pathway's content to the structural layout?</h2>
<p>Fused minus structural on the same test images (paired bootstrap, 95% interval): "yes" only when the whole interval lies above 0.</p>
<ul>{% for line in fusion %}<li>{{ line }}</li>{% endfor %}</ul>
<p>Full evaluation reports: {% for title, link in links %}<a href="{{ link }}">{{ title }}</a>{% if not loop.last %}, {% endif %}{% endfor %}.</p>
<h2>The first {{ grid|length }} test images</h2>
<table class="grid"><tr><th>stimulus</th>{% for label in grid_labels %}<th>{{ label }}</th>{% endfor %}</tr>
{% for row in grid %}<tr><td><img src="{{ row.stimulus }}" alt="stimulus"></td>{% for label, uri in row.images %}<td><img src="{{ uri }}" alt="{{ label }}"></td>{% endfor %}</tr>
{% endfor %}</table>
</body></html>
"""


def _cell(mean: float, interval, percent: bool) -> str:
    if percent:
        return f"{100 * mean:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return f"{mean:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def fusion_lines(fusion_vs_structural: dict) -> list[str]:
    """One sentence per run and measure, e.g. "method: fusion adds object content (object-kind
    F1): no, difference fused - structural +0.001 [-0.050, 0.052]"."""
    what = {"object_kind_f1": "object content", "mini_clip_identification": "identifiable content"}
    return [
        f"{RUN_TITLES.get(run, run)}: fusion adds {what.get(name, name)} ({DEMO_MEASURES[name][0]}): "
        f"{'yes' if gain['higher'] else 'no'}, difference fused − structural {gain['difference']:+.3f} "
        f"[{gain['interval'][0]:.3f}, {gain['interval'][1]:.3f}]"
        for run, by_name in fusion_vs_structural.items() for name, gain in by_name.items()
    ]


def write_demo_page(out: Path, data: Path, evaluations: dict, measures: dict, *, notes=(), recons: dict[str, Path],
                    modes=("structural", "fused", "semantic"), grid_images: int = 6) -> Path:
    """Write ``out/demo.html``; returns its path.

    ``evaluations[run][mode]``: :class:`~havir.metrics.evaluate.Evaluation` of each run (``method``,
    ``null``) and mode; ``measures``: the demo measures' summary
    (:func:`~havir.demo_world.measures.summarise_runs`); ``recons[run]``: the folder holding each
    run's mode folders.
    """
    from jinja2 import Environment
    from markupsafe import Markup

    columns = {name: title for name, title in _METRICS.items() if any(name in e.scores for by_mode in evaluations.values() for e in by_mode.values())}
    columns |= {name: title for name, (title, _) in DEMO_MEASURES.items()}
    rows = []
    for run, by_mode in evaluations.items():
        for mode in modes:
            scores, demo = by_mode[mode].scores, measures["by_mode"][run][mode]
            cells = []
            for name in columns:
                if name in demo:
                    cells.append(_cell(demo[name]["mean"], demo[name]["interval"], name != "object_kind_f1"))
                elif name in scores:
                    cells.append(_cell(scores[name].mean, scores[name].interval, name == "lite0_identification"))
                else:
                    cells.append("—")
            rows.append({"run": run, "run_title": RUN_TITLES.get(run, run), "mode": mode, "cells": cells})
    nsd_ids, stimuli, _ = load_ground_truth(data, 1)
    shown = nsd_ids[:grid_images]
    pictures = {(run, mode): load_reconstructions(Path(recon) / mode, shown, exact=False) for run, recon in recons.items() for mode in modes}
    grid = [{"stimulus": _data_uri(stimuli[i], 96), "images": [(f"{run} {mode}", _data_uri(images[i], 96)) for (run, mode), images in pictures.items()]}
            for i in range(len(shown))]
    links = [(f"{RUN_TITLES.get(run, run)}, fused", os.path.relpath(by_mode["fused"].outputs["report"], out))
             for run, by_mode in evaluations.items() if "report" in by_mode["fused"].outputs]
    page = Environment(autoescape=True).from_string(_PAGE).render(
        style=Markup(_STYLE), n=len(nsd_ids), notes=list(notes), warning=NULL_WARNING, columns=columns, rows=rows,
        measure_note=DEMO_MEASURE_NOTE, links=links, resamples=BOOTSTRAP["resamples"],
        fusion=fusion_lines(measures["fusion_vs_structural"]), grid=grid, grid_labels=[f"{RUN_TITLES.get(r, r)}: {m}" for r, m in pictures],
    )
    path = Path(out) / "demo.html"
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path

