"""An HTML report of an evaluation: metrics with intervals, the published rows, a bar chart and
an image grid (stimulus | each reconstruction mode found beside the scored folder).

The report is one self-contained file (images and chart embedded as data URIs), so it opens
offline, can be mailed, and does not break when the folders move.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from havir.io import atomic_path
from havir.metrics.evaluate import PROTOCOL_NAMES, PUBLISHED_PROTOCOL, Evaluation, comparison_rows, load_reconstructions

#: Column order of the image grid; folders with another mode (or none) follow by name.
_MODE_ORDER = ("structural", "fused", "semantic")
_TITLES = {
    "pixcorr": "PixCorr", "ssim": "SSIM", "alexnet2": "AlexNet(2)", "alexnet5": "AlexNet(5)",
    "inception": "Inception", "clip": "CLIP", "effnet": "EffNet-B", "swav": "SwAV",
    "lite0_identification": "Lite0 ident. (stand-in)",
}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, table:not(.grid) td:last-child { text-align: left; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 128px; height: 128px; image-rendering: auto; }
"""


def reconstruction_columns(recon: Path) -> list[tuple[str, Path]]:
    """(label, folder) for the scored folder and every sibling written by `havir reconstruct`
    (it holds a ``manifest.json``), labelled by mode, in the order structural, fused, semantic."""
    recon = Path(recon)
    folders = [recon] + sorted(p for p in recon.parent.iterdir() if p.is_dir() and p != recon and (p / "manifest.json").is_file())

    def label(folder: Path) -> str:
        manifest = folder / "manifest.json"
        return json.loads(manifest.read_text()).get("mode", folder.name) if manifest.is_file() else folder.name

    columns = [(label(folder), folder) for folder in folders]
    rank = {mode: i for i, mode in enumerate(_MODE_ORDER)}
    return sorted(columns, key=lambda column: (rank.get(column[0], len(rank)), column[0]))


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
    labels = [_TITLES.get(n, n) + ("" if evaluation.scores[n].higher_is_better else "\n(lower better)") for n in names]
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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _format(name: str, value: float) -> str:
    percent = name not in ("pixcorr", "ssim", "effnet", "swav")
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


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
    shown first, in a highlighted box (the demo says there which components are random).
    """
    out = Path(out)
    chart = bar_chart(evaluation)
    with atomic_path(out / "metrics.png") as temporary:
        temporary.write_bytes(chart)

    data = evaluation.protocol.get("data", {})
    metric_rows = [
        [html.escape(_TITLES.get(name, name)), _format(name, score.mean),
         f"[{_format(name, score.interval[0])}, {_format(name, score.interval[1])}]",
         "higher" if score.higher_is_better else "lower", html.escape(score.network)]
        for name, score in evaluation.scores.items()
    ]
    comparison = [
        [html.escape(row["method"]), *(_format(n, row[n]) if n in row else "—" for n in PROTOCOL_NAMES), html.escape(row["protocol"])]
        for row in comparison_rows(evaluation, "this run")
    ]
    skipped = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in evaluation.skipped.items())

    columns = reconstruction_columns(recon)
    shown = np.arange(min(grid_images, len(evaluation.nsd_ids)))
    column_images = {}
    for label, folder in columns:
        try:
            column_images[folder] = load_reconstructions(folder, evaluation.nsd_ids[shown], exact=False)
        except FileNotFoundError:  # a sibling run with --limit: leave its column out
            continue
    columns = [(label, folder) for label, folder in columns if folder in column_images]
    grid_rows = []
    for row in shown:
        cells = [f'<img src="{_data_uri(ground_truth[row])}" alt="stimulus">']
        cells += [f'<img src="{_data_uri(column_images[folder][row])}" alt="{html.escape(label)}">' for label, folder in columns]
        grid_rows.append([*cells, str(int(evaluation.nsd_ids[row]))])
    grid_header = ["stimulus", *(label for label, _ in columns), "nsdId"]
    grid = _table(grid_header, grid_rows).replace("<table>", '<table class="grid">', 1)

    notes_html = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Subject {data.get('subject')}, {data.get('sessions')} sessions, {len(evaluation.nsd_ids)} test images;
scored folder <code>{html.escape(str(recon))}</code>.</p>
{f'<div class="note">{notes_html}</div>' if notes else ''}
<h2>Metrics</h2>
{_table(["metric", "mean", "95% CI (bootstrap)", "better", "network"], metric_rows)}
{f'<p>Skipped:</p><ul>{skipped}</ul>' if skipped else ''}
<img src="{_data_uri(chart)}" alt="bar chart of the metrics">
<h2>Against published pipelines</h2>
<p>Published rows: {html.escape(PUBLISHED_PROTOCOL)}. Numbers from another subject, session count
or image count, or from a network that is not the protocol's, are not comparable with them.</p>
{_table(["method", *(_TITLES[n] for n in PROTOCOL_NAMES), "protocol"], comparison)}
<h2>Reconstructions (first {len(shown)} test images)</h2>
{grid}
</body></html>
"""
    path = out / "report.html"
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path
