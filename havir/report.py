"""An HTML report of an evaluation: metrics with intervals, the published rows, a bar chart and
an image grid (stimulus | each reconstruction mode found beside the scored folder).

The report is one self-contained file (images and chart embedded as data URIs), so it opens
offline, can be mailed, and does not break when the folders move.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from markupsafe import Markup

from havir.errors import MissingInputError
from havir.io import atomic_path
from havir.artifacts.reconstruction import load_reconstructions
from havir.metrics.records import metric_record
from havir.metrics.results import PROTOCOL_NAMES, Evaluation, comparison_rows

#: Column order of the image grid; folders with another mode (or none) follow by name.
_MODE_ORDER = ("structural", "fused", "semantic")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, table:not(.grid) td:last-child { text-align: left; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 128px; height: 128px; image-rendering: auto; }
"""


def reconstruction_columns(recon: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(label, folder) for the scored folder and every sibling written by `havir reconstruct`
    (it holds a ``manifest.json``), labelled by mode, in the order structural, fused, semantic;
    and a note for each sibling left out because its manifest cannot be read. A sibling is only
    shown, never scored, so a broken one never stops the evaluation of ``recon``."""
    recon = Path(recon)
    folders = [recon] + sorted(p for p in recon.parent.iterdir() if p.is_dir() and p != recon and (p / "manifest.json").is_file())
    columns, notes = [], []
    for folder in folders:
        manifest = folder / "manifest.json"
        try:
            mode = json.loads(manifest.read_text()).get("mode", folder.name) if manifest.is_file() else folder.name
        except (OSError, ValueError, AttributeError) as err:
            if folder == recon:
                mode = folder.name
            else:
                notes.append(f"sibling folder {folder} not shown: its manifest.json cannot be read ({type(err).__name__})")
                continue
        columns.append((str(mode), folder))
    rank = {mode: i for i, mode in enumerate(_MODE_ORDER)}
    return sorted(columns, key=lambda column: (rank.get(column[0], len(rank)), column[0])), notes


def _data_uri(image: np.ndarray | bytes, side: int | None = 128) -> str:
    if isinstance(image, bytes):
        payload = image
    else:
        picture = PIL.Image.fromarray(image)
        if side is not None:
            picture = picture.resize((side, side), PIL.Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        payload = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(payload).decode("ascii")


def bar_chart(evaluation: Evaluation) -> bytes:
    """PNG bar chart of every metric with its 95% interval; distances are marked lower-is-better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluation.scores)
    means = [evaluation.scores[n].mean for n in names]
    low = [evaluation.scores[n].mean - evaluation.scores[n].interval[0] for n in names]
    high = [evaluation.scores[n].interval[1] - evaluation.scores[n].mean for n in names]
    colours = ["#4c72b0" if evaluation.scores[n].protocol else "#c44e52" for n in names]
    labels = [metric_record(n).title + ("" if evaluation.scores[n].higher_is_better else "\n(lower better)") for n in names]
    figure, axes = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.6), dpi=110)
    axes.bar(range(len(names)), means, yerr=[low, high], color=colours, capsize=3)
    axes.set_xticks(range(len(names)), labels, fontsize=8)
    axes.set_ylim(min(0, min(means) - 0.05), 1.0)
    axes.set_ylabel("score (fraction)")
    axes.set_title(f"n = {len(evaluation.nsd_ids)} images; red: not a protocol network", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _format(name: str, value: float) -> str:
    return metric_record(name).format(value)


# Every value is escaped by Jinja2's autoescape (strings from the prepared data, folder names,
# manifests and labels included); only the data URIs, which this module builds, are trusted.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<p>Subject {{ data.subject }}, {{ data.sessions }} sessions, {{ n }} test images; protocol preset
<b>{{ preset }}</b>; scored folder <code>{{ recon }}</code>.</p>
{% if notes %}<div class="note">{% for note in notes %}<p>{{ note }}</p>{% endfor %}</div>{% endif %}
<h2>Metrics</h2>
<table><tr>{% for h in ["metric", "mean", "95% CI (bootstrap)", "better", "network"] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in metric_rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if skipped %}<p>Skipped:</p><ul>{% for name, reason in skipped.items() %}<li><b>{{ name }}</b>: {{ reason }}</li>{% endfor %}</ul>{% endif %}
<img src="{{ chart }}" alt="bar chart of the metrics">
<h2>Against published pipelines ({{ preset }} preset)</h2>
<p>Only rows computed with the same preset are comparable; numbers from another subject, session
count or image count, or from a network that is not the protocol's, are not comparable either.</p>
{% for line in comparison.notes %}<p class="note">{{ line }}</p>{% endfor %}
{% if comparison.rows|length > 1 %}{{ table(comparison.rows, "protocol") }}{% else %}<p>No published row was computed with the {{ preset }} preset.</p>{{ table(comparison.rows, "protocol") }}{% endif %}
{% if comparison.other_presets %}<h3>Rows of other presets (not comparable with this run)</h3>
{{ table(comparison.other_presets, "reason") }}{% endif %}
<h2>Reconstructions (first {{ grid_rows|length }} test images)</h2>
<table class="grid"><tr><th>stimulus</th>{% for label in grid_labels %}<th>{{ label }}</th>{% endfor %}<th>nsdId</th></tr>
{% for row in grid_rows %}<tr><td><img src="{{ row.stimulus }}" alt="stimulus"></td>{% for label, uri in row.images %}<td><img src="{{ uri }}" alt="{{ label }}"></td>{% endfor %}<td>{{ row.nsd_id }}</td></tr>
{% endfor %}</table>
</body></html>
"""
_COMPARISON = """<table><tr><th>method</th>{% for n in names %}<th>{{ titles[n] }}</th>{% endfor %}<th>{{ last }}</th></tr>
{% for row in rows %}<tr><td>{{ row.method }}</td>{% for n in names %}<td>{{ fmt(n, row[n]) if n in row else "—" }}</td>{% endfor %}<td>{{ row[last] }}</td></tr>
{% endfor %}</table>"""


def write_report(
    evaluation: Evaluation,
    ground_truth: np.ndarray,
    recon: Path,
    out: Path,
    *,
    title: str = "HAVIR reconstruction report",
    notes: Sequence[str] = (),
    grid_images: int = 12,
) -> Path:
    """Write ``out/report.html`` and ``out/metrics.png`` (the bar chart); returns the report's path.

    ``ground_truth`` : uint8 (n, s, s, 3) in the order of ``evaluation.nsd_ids``. ``notes`` are
    shown first, in a highlighted box (the demo says there which components are random); notes
    about sibling folders left out are added to ``evaluation.notes``.
    """
    from jinja2 import Environment

    out = Path(out)
    chart = bar_chart(evaluation)
    with atomic_path(out / "metrics.png") as temporary:
        temporary.write_bytes(chart)

    metric_rows = [
        [metric_record(name).title, _format(name, score.mean),
         f"[{_format(name, score.interval[0])}, {_format(name, score.interval[1])}]",
         "higher" if score.higher_is_better else "lower", score.network]
        for name, score in evaluation.scores.items()
    ]
    columns, column_notes = reconstruction_columns(recon)
    shown = np.arange(min(grid_images, len(evaluation.nsd_ids)))
    column_images = {}
    for label, folder in columns:
        try:
            column_images[folder] = load_reconstructions(folder, evaluation.nsd_ids[shown], exact=False)
        except MissingInputError:  # a sibling run with --limit: its column is left out
            continue
        except (ValueError, OSError) as err:  # a broken sibling: shown without it, with a note
            column_notes.append(f"sibling folder {folder} not shown: {err}")
    evaluation.notes.extend(column_notes)
    columns = [(label, folder) for label, folder in columns if folder in column_images]
    grid_rows = [
        {"stimulus": _data_uri(ground_truth[row]), "nsd_id": int(evaluation.nsd_ids[row]),
         "images": [(label, _data_uri(column_images[folder][row])) for label, folder in columns]}
        for row in shown
    ]
    environment = Environment(autoescape=True)
    table = environment.from_string(_COMPARISON)

    def comparison_table(rows, last):
        titles = {name: metric_record(name).title for name in PROTOCOL_NAMES}
        return Markup(table.render(rows=rows, names=PROTOCOL_NAMES, titles=titles, last=last, fmt=_format))

    page = environment.from_string(_PAGE).render(
        title=title, style=Markup(_STYLE), data=evaluation.protocol.get("data", {}), n=len(evaluation.nsd_ids),
        preset=evaluation.protocol.get("preset", "mindeye2"), recon=str(recon), notes=[*notes, *evaluation.notes],
        metric_rows=metric_rows, skipped=evaluation.skipped, chart=_data_uri(chart),
        comparison=comparison_rows(evaluation, "this run"), table=comparison_table,
        grid_labels=[label for label, _ in columns], grid_rows=grid_rows,
    )
    path = out / "report.html"
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path
