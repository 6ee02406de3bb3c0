"""An HTML report of an evaluation: metrics with intervals, a chart per kind of metric, the
modes side by side (when their folders were evaluated too), the training curves of the run that
made the reconstructions, the subject's masks on its brain (when the prepared data names them),
the published rows, and every test image (stimulus | each reconstruction mode found beside the
scored folder) with its scores, sortable by any metric.

The report is one self-contained file (images and chart embedded as data URIs), so it opens
offline, can be mailed, and does not break when the folders move.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from markupsafe import Markup

from havir.artifacts.prepared import prepared_record_path
from havir.artifacts.reconstruction import is_havir_reconstruction, load_reconstructions, read_manifest
from havir.errors import HavirError, MissingInputError
from havir.io import atomic_path
from havir.metrics.records import metric_record
from havir.metrics.results import BRAIN_PREFIX, PROTOCOL_NAMES, Evaluation, comparison_rows, subject_label
from havir.metrics.networks import STANDIN_METRICS
from havir.metrics.protocols import PROTOCOL_METRICS

#: Column order of the image grid; folders with another mode (or none) follow by name.
_MODE_ORDER = ("structural", "fused", "semantic")


class _Titles(dict):
    """Every metric's title from its record (``titles[name]`` and ``titles.get(name)`` in templates)."""

    def get(self, name, default=None):
        return metric_record(name).title

    __getitem__ = get


_TITLES = _Titles()
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, table:not(.grid) td:last-child { text-align: left; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
img.figure { max-width: 100%; height: auto; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 128px; height: 128px; image-rendering: auto; }
.grid th.sortable { cursor: pointer; text-decoration: underline dotted; }
"""
#: Sorts the image grid by a clicked score column: best first, a second click worst first.
_SORT_SCRIPT = """
document.querySelectorAll("th.sortable").forEach(function (header) {
  header.addEventListener("click", function () {
    var body = document.querySelector("#grid tbody"), key = header.dataset.key;
    var higher = header.dataset.higher === "1", best = header.dataset.order !== "best";
    header.dataset.order = best ? "best" : "worst";
    var rows = Array.from(body.querySelectorAll("tr"));
    rows.sort(function (a, b) {
      var d = parseFloat(a.dataset[key]) - parseFloat(b.dataset[key]);
      return (higher === best) ? -d : d;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    document.getElementById("order").textContent = (best ? "best" : "worst") + " first by " + header.textContent;
  });
});
"""

#: How each metric's score is read: the panels of the chart.
_KINDS = {
    "pixel similarity": ("pixcorr", "ssim"),
    "two-way identification (chance 50%)": tuple(
        m.name for m in (*PROTOCOL_METRICS, *STANDIN_METRICS) if m.score == "identification"),
    "feature distance (lower is better)": tuple(
        m.name for m in (*PROTOCOL_METRICS, *STANDIN_METRICS) if m.score == "distance"),
}


def reconstruction_columns(recon: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(label, folder) for the scored folder and every sibling written by `havir reconstruct`
    (it holds a ``manifest.json``), labelled by mode, in the order structural, fused, semantic;
    and a note for each sibling left out because its manifest cannot be read. A sibling is only
    shown, never scored, so a broken one never stops the evaluation of ``recon``."""
    recon = Path(recon)
    folders = [recon] + sorted(p for p in recon.parent.iterdir() if p.is_dir() and p != recon and is_havir_reconstruction(p))
    columns, notes = [], []
    for folder in folders:
        try:
            mode = read_manifest(folder).get("mode", folder.name) if is_havir_reconstruction(folder) else folder.name
        except HavirError as err:
            if folder == recon:
                mode = folder.name
            else:
                notes.append(f"sibling folder {folder} not shown: its manifest.json cannot be read ({type(err).__name__})")
                continue
        columns.append((str(mode), folder))
    rank = {mode: i for i, mode in enumerate(_MODE_ORDER)}
    return sorted(columns, key=lambda column: (rank.get(column[0], len(rank)), column[0])), notes


def _data_uri(image: np.ndarray | bytes, side: int | None = 128) -> str:
    """A PNG (a chart's bytes) or a thumbnail of an image (uint8 (s, s, 3)) as a data URI.

    Thumbnails are JPEG: every test image is in the report (1000 in NSD, with 3 modes), and a
    128-px JPEG is a tenth of the PNG's size.
    """
    if isinstance(image, bytes):
        return "data:image/png;base64," + base64.b64encode(image).decode("ascii")
    picture = PIL.Image.fromarray(image).convert("RGB")
    if side is not None:
        picture = picture.resize((side, side), PIL.Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chart_panels(evaluation: Evaluation) -> list[tuple[str, list[str]]]:
    """The chart's panels: (kind, the metrics of that kind this evaluation has), in ``_KINDS``'
    order, kinds without a metric left out, metrics of no known kind last under "other"."""
    panels = [(kind, [n for n in names if n in evaluation.scores]) for kind, names in _KINDS.items()]
    known = {n for _, names in panels for n in names}
    panels = [(kind, names) for kind, names in panels if names]
    if other := [n for n in evaluation.scores if n not in known]:
        panels.append(("other", other))
    return panels


def chart_title(evaluation: Evaluation) -> str:
    """The chart's title; it explains red bars only when there are some."""
    not_protocol = any(not score.protocol for score in evaluation.scores.values())
    return (f"n = {len(evaluation.nsd_ids)} images; bars: mean with 95% interval"
            + ("; red: not a protocol network" if not_protocol else ""))


def bar_chart(evaluation: Evaluation) -> bytes:
    """PNG chart of every metric with its 95% interval, one panel per kind of metric (pixel
    similarity, identification with its 50% chance line, distance), each on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = chart_panels(evaluation)
    widths = [max(len(names), 2) for _, names in panels]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(max(4, 1.3 * sum(widths) + 1), 3.6), dpi=110,
                                     gridspec_kw={"width_ratios": widths}, squeeze=False)
    for axes, (kind, names) in zip(axes_list[0], panels):
        scores = [evaluation.scores[n] for n in names]
        means = [score.mean for score in scores]
        errors = [[m - score.interval[0] for m, score in zip(means, scores)], [score.interval[1] - m for m, score in zip(means, scores)]]
        colours = ["#4c72b0" if score.protocol else "#c44e52" for score in scores]
        axes.bar(range(len(names)), means, yerr=errors, color=colours, capsize=3)
        axes.set_xticks(range(len(names)), [_TITLES.get(n, n) for n in names], fontsize=8, rotation=20)
        axes.set_title(textwrap.fill(kind, 24), fontsize=9)
        top = max(score.interval[1] for score in scores)
        if kind.startswith("two-way"):
            axes.axhline(0.5, color="#555", linestyle="--", linewidth=1)
            axes.set_ylim(0, 1)
        elif kind.startswith("pixel"):
            axes.set_ylim(min(0, min(score.interval[0] for score in scores) - 0.05), 1)
        else:  # distances are not bounded by 1
            axes.set_ylim(0, max(1.0, 1.1 * top))
    axes_list[0][0].set_ylabel("score")
    figure.suptitle(chart_title(evaluation), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def training_curves(recon: Path) -> bytes | None:
    """PNG of the training and validation losses per epoch of the run that made ``recon`` (its
    manifest names the run; the run's ``metrics.jsonl`` holds one line per epoch), or None when
    the run is not known or its metrics cannot be read."""
    try:
        run = Path(read_manifest(recon)["run"])
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        curves = {(split, name): [epoch[f"{split}_loss"][name] for epoch in epochs]
                  for split in ("train", "val") for name in epochs[0]["train_loss"]}
        numbers = [epoch["epoch"] for epoch in epochs]
    except (HavirError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for _, name in curves))  # the run's order: structural, semantic
    figure, axes_list = plt.subplots(1, len(names), figsize=(4 * len(names), 3), dpi=110, squeeze=False)
    for axes, name in zip(axes_list[0], names):
        for split, style in (("train", "-"), ("val", "--")):
            axes.plot(numbers, curves[split, name], style, marker="o", markersize=3, label=split)
        axes.set_title(f"{name} decoder loss", fontsize=9)
        axes.set_xlabel("epoch")
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def masks_figure(data: Path | None, subject: int | None) -> tuple[bytes | None, str | None]:
    """(PNG of the subject's ROI masks on its brain, a note when they cannot be drawn).

    The masks are rebuilt (:func:`havir.masks.build_masks`, drawn by
    :func:`havir.masks.mask_figure`) from what the prepared subject's record names: the NSD
    release folder and the mask definition. They are drawn only when their voxel counts are
    the record's, so the figure shows the voxels the decoders read. Prepared data without such
    a record gives (None, None): the report has no masks section.
    """
    record_file = prepared_record_path(data, subject) if data is not None and subject is not None else None
    try:
        record = json.loads(record_file.read_text()) if record_file is not None and record_file.is_file() else {}
        recorded, nsd_root = record["masks"], record["nsd_root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return _drawn_masks(json.dumps({"masks": recorded, "nsd_root": nsd_root, "subject": subject}, sort_keys=True))


@functools.lru_cache(maxsize=4)  # the demo writes six reports of one subject
def _drawn_masks(key: str) -> tuple[bytes | None, str | None]:
    from havir.masks import MaskDefinition, build_masks, mask_figure
    from havir.nsd.layout import NSDLayout

    named = json.loads(key)
    recorded, layout = named["masks"], NSDLayout(named["nsd_root"])
    try:
        masks = build_masks(layout, named["subject"], MaskDefinition.from_dict(recorded["definition_content"]))
    except (HavirError, KeyError, TypeError) as err:
        return None, f"masks not drawn: they cannot be rebuilt from {layout.root} ({err})"
    counts = {which: int(masks.summary()[f"{which}_voxels"]) for which in ("structural", "semantic")}
    if counts != {which: recorded.get(f"{which}_voxels") for which in counts}:
        return None, (f"masks not drawn: {layout.root} now gives {counts['structural']} structural and "
                      f"{counts['semantic']} semantic voxels, not the prepared data's")
    return mask_figure(masks, layout), None


def mode_rows(evaluation: Evaluation, columns: Sequence[tuple[str, Path]], recon: Path) -> tuple[list[dict], list[str]]:
    """One row per reconstruction mode (label, n, every metric's mean): the scored folder's from
    ``evaluation``, each sibling's from its own ``eval/eval.json`` when it was evaluated; and a
    note for each sibling whose record cannot be read."""
    rows, notes = [], []
    for label, folder in columns:
        if Path(folder) == Path(recon):
            rows.append({"mode": label, "n": len(evaluation.nsd_ids)} | {n: s.mean for n, s in evaluation.scores.items()})
            continue
        record = Path(folder) / "eval" / "eval.json"
        if not record.is_file():
            continue
        try:
            summary = json.loads(record.read_text())
            means = {str(name): float(detail["mean"]) for name, detail in summary["details"].items()}
            rows.append({"mode": label, "n": int(summary["n"])} | means)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            notes.append(f"{record} not compared: it cannot be read ({type(err).__name__})")
    return (rows if len(rows) > 1 else []), notes


def _format(name: str, value: float) -> str:
    return metric_record(name).format(value)


# Every value is escaped by Jinja2's autoescape (strings from the prepared data, folder names,
# manifests and labels included); only the data URIs, which this module builds, are trusted.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ subject }}, {{ data.sessions }} sessions, {{ n }} test images; protocol preset
<b>{{ preset }}</b>; scored folder <code>{{ recon }}</code>.</p>
{% if notes %}<div class="note">{% for note in notes %}<p>{{ note }}</p>{% endfor %}</div>{% endif %}
<h2>Metrics</h2>
<table><tr>{% for h in ["metric", "mean", "95% CI (bootstrap)", "better", "network"] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in metric_rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if skipped %}<p>Skipped:</p><ul>{% for name, reason in skipped.items() %}<li><b>{{ name }}</b>: {{ reason }}</li>{% endfor %}</ul>{% endif %}
<img src="{{ chart }}" alt="bar charts of the metrics, one per kind">
{% if modes %}<h2>Modes compared</h2>
<table id="modes"><tr><th>mode</th><th>n</th>{% for n in mode_names %}<th>{{ titles.get(n, n) }}</th>{% endfor %}</tr>
{% for row in modes %}<tr><td>{{ row.mode }}</td><td>{{ row.n }}</td>{% for n in mode_names %}<td>{{ fmt(n, row[n]) if n in row else "—" }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}
{% if versus %}<h2>Method vs null</h2>
<p>The null run is the same pipeline trained on shuffled voxel-image pairs (<code>havir train --control
shuffled</code>). A generative model can paint a plausible scene from nothing: a score means
something only by how far it beats the null's. Null reconstructions: <code>{{ versus.null_reconstructions }}</code>.</p>
<table id="versus"><tr>{% for h in ["metric", "method", "null", "difference", "95% CI (paired bootstrap)", "beats the null"] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for name, row in versus.metrics.items() %}<tr><td>{{ titles.get(name, name) }}</td><td>{{ fmt(name, row.method) }}</td><td>{{ fmt(name, row.null) }}</td><td>{{ "%+.3f"|format(row.difference) }}</td><td>[{{ "%+.3f"|format(row.interval_95[0]) }}, {{ "%+.3f"|format(row.interval_95[1]) }}]</td><td>{{ "yes" if row.beats_null else "no" }}</td></tr>
{% endfor %}</table>{% endif %}
{% if brain %}<h2>Brain consistency</h2>
<p>Mean over voxels of the Pearson r, across the test images, between the encoding model's prediction
and the measured betas; the ceiling is the same from the ground-truth stimuli. Encoding model:
<code>{{ brain.encoder.path }}</code>.</p>
<table id="brain"><tr><th>voxels</th><th>from the reconstructions</th><th>ceiling (ground truth)</th><th>ratio</th></tr>
{% for name, ceiling in brain.ceilings.items() %}<tr><td>{{ name }} set</td><td>{{ "%.3f"|format(brain_values[name]) }}</td><td>{{ "%.3f"|format(ceiling) }}</td><td>{{ "%.2f"|format(brain.ratios[name]) if brain.ratios[name] is not none else "—" }}</td></tr>
{% endfor %}{% for name, value in brain.rois.items() %}<tr><td>{{ name }}</td><td>{{ "%.3f"|format(value) }}</td><td>{{ "%.3f"|format(brain.roi_ceilings[name]) }}</td><td></td></tr>
{% endfor %}</table>{% endif %}
{% if masks %}<h2>Masks</h2>
<p>The voxels the decoders read, one colour per ROI (structural set warm, semantic set cool), on
axial slices of the subject's brain.</p>
<img class="figure" src="{{ masks }}" alt="the subject's structural and semantic ROIs on axial brain slices">{% endif %}
{% if curves %}<h2>Training</h2>
<p>Losses per epoch of the run that made these reconstructions (<code>metrics.jsonl</code>).</p>
<img src="{{ curves }}" alt="training and validation losses per epoch">{% endif %}
<h2>Against published pipelines ({{ preset }} preset)</h2>
<p>Only rows computed with the same preset are comparable; numbers from another subject, session
count or image count, or from a network that is not the protocol's, are not comparable either.</p>
{% for line in comparison.notes %}<p class="note">{{ line }}</p>{% endfor %}
{% if comparison.rows|length > 1 %}{{ table(comparison.rows, "protocol") }}{% else %}<p>No published row was computed with the {{ preset }} preset.</p>{{ table(comparison.rows, "protocol") }}{% endif %}
{% if comparison.other_presets %}<h3>Rows of other presets (not comparable with this run)</h3>
{{ table(comparison.other_presets, "reason") }}{% endif %}
<h2>Reconstructions (all {{ grid_rows|length }} test images)</h2>
<p>Scores are those of the scored folder ({{ scored_label }}); click a score's heading to sort by it, best
first, and again for worst first (now: <span id="order">by nsdId</span>). The same numbers are in
<a href="{{ csv_name }}">{{ csv_name }}</a>.</p>
<table class="grid" id="grid"><thead><tr><th>stimulus</th>{% for label in grid_labels %}<th>{{ label }}</th>{% endfor %}<th>nsdId</th>
{% for n in score_names %}<th class="sortable" data-key="{{ n }}" data-higher="{{ 1 if higher[n] else 0 }}">{{ titles.get(n, n) }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in grid_rows %}<tr{% for n in score_names %} data-{{ n }}="{{ row.scores[n] }}"{% endfor %}><td><img src="{{ row.stimulus }}" alt="stimulus"></td>{% for label, uri in row.images %}<td><img src="{{ uri }}" alt="{{ label }}"></td>{% endfor %}<td>{{ row.nsd_id }}</td>{% for n in score_names %}<td>{{ fmt(n, row.scores[n]) }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
<script>{{ script }}</script>
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
    thumbnail_side: int = 128,
    data: Path | None = None,
) -> Path:
    """Write ``out/report.html`` and ``out/metrics.png`` (the bar charts); returns the report's path.

    ``ground_truth`` : uint8 (n, s, s, 3) in the order of ``evaluation.nsd_ids``. ``notes`` are
    shown first, in a highlighted box (the demo says there which components are random); notes
    about sibling folders left out are added to ``evaluation.notes``. Every test image is in the
    grid, as a ``thumbnail_side``-pixel JPEG. ``data`` (the prepared data folder) lets the report
    draw the subject's masks (:func:`masks_figure`).
    """
    from jinja2 import Environment

    out = Path(out)
    chart = bar_chart(evaluation)
    with atomic_path(out / "metrics.png") as temporary:
        temporary.write_bytes(chart)

    metric_rows = [
        [_TITLES.get(name, name), _format(name, score.mean),
         f"[{_format(name, score.interval[0])}, {_format(name, score.interval[1])}]",
         "higher" if score.higher_is_better else "lower", score.network]
        for name, score in evaluation.scores.items()
    ]
    columns, column_notes = reconstruction_columns(recon)
    shown = np.arange(len(evaluation.nsd_ids))
    column_images = {}
    for label, folder in columns:
        try:
            column_images[folder] = load_reconstructions(folder, evaluation.nsd_ids[shown], exact=False)
        except MissingInputError:  # a sibling run with --limit: its column is left out
            continue
        except (ValueError, OSError) as err:  # a broken sibling: shown without it, with a note
            column_notes.append(f"sibling folder {folder} not shown: {err}")
    modes, mode_notes = mode_rows(evaluation, [(label, folder) for label, folder in columns if folder in column_images or folder == recon], recon)
    evaluation.notes.extend(column_notes + mode_notes)
    columns = [(label, folder) for label, folder in columns if folder in column_images]
    score_names = list(evaluation.scores)
    grid_rows = [
        {"stimulus": _data_uri(ground_truth[row], thumbnail_side), "nsd_id": int(evaluation.nsd_ids[row]),
         "images": [(label, _data_uri(column_images[folder][row], thumbnail_side)) for label, folder in columns],
         "scores": {name: float(evaluation.scores[name].per_image[row]) for name in score_names}}
        for row in shown
    ]
    environment = Environment(autoescape=True)
    table = environment.from_string(_COMPARISON)

    def comparison_table(rows, last):
        return Markup(table.render(rows=rows, names=PROTOCOL_NAMES, titles=_TITLES, last=last, fmt=_format))

    data_protocol = evaluation.protocol.get("data", {})
    masks, masks_note = masks_figure(data, data_protocol.get("subject"))
    evaluation.notes.extend([masks_note] if masks_note else [])
    curves = training_curves(recon)
    page = environment.from_string(_PAGE).render(
        title=title, style=Markup(_STYLE), data=data_protocol,
        subject=subject_label(data_protocol)[:1].upper() + subject_label(data_protocol)[1:], n=len(evaluation.nsd_ids),
        preset=evaluation.protocol.get("preset", "mindeye2"), recon=str(recon), notes=[*notes, *evaluation.notes],
        metric_rows=metric_rows, skipped=evaluation.skipped, chart=_data_uri(chart),
        modes=modes, mode_names=[n for n in score_names if any(n in row for row in modes)],
        curves=_data_uri(curves) if curves else None, masks=_data_uri(masks) if masks else None,
        comparison=comparison_rows(evaluation, "this run"), table=comparison_table, titles=_TITLES, fmt=_format,
        grid_labels=[label for label, _ in columns], grid_rows=grid_rows, score_names=score_names,
        higher={n: evaluation.scores[n].higher_is_better for n in score_names},
        scored_label=evaluation.protocol.get("method", Path(recon).name), csv_name="per_image.csv",
        script=Markup(_SORT_SCRIPT), versus=evaluation.null_comparison, brain=evaluation.brain,
        brain_values={name.removeprefix(BRAIN_PREFIX): score.mean for name, score in evaluation.scores.items()
                      if name.startswith(BRAIN_PREFIX)},
    )
    path = out / "report.html"
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path
