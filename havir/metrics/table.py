"""The published-style table (``havir table``): several subjects' ``eval.json`` averaged into one
row, printed beside the published rows of the same protocol preset.

Published tables report the mean over subjects (NSD subjects 1, 2, 5 and 7) of each metric. A
mean is only meaningful over runs scored the same way, so :func:`subject_table` refuses to
average runs of different presets, image counts, session counts, methods or voxel normalisations,
or one subject twice.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from havir.errors import InvalidInputError, MissingInputError
from havir.metrics.records import metric_record
from havir.metrics.results import PROTOCOL_NAMES, published_rows

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


@dataclass
class SubjectTable:
    """The mean over subjects of every protocol metric that all runs computed.

    ``row`` : {metric: mean over subjects (fraction)}; ``subjects`` : the subjects averaged, in
    the order given; ``missing`` : metrics some run skipped (left out of ``row``); ``published``
    : rows of the same preset; ``other_presets`` : (row, reason) for the rest.
    """

    method: str
    preset: str
    subjects: list[int]
    images: int
    sessions: int | None
    row: dict[str, float]
    missing: list[str] = field(default_factory=list)
    published: list = field(default_factory=list)
    other_presets: list = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "method": self.method, "preset": self.preset, "subjects": self.subjects, "images": self.images,
            "sessions": self.sessions, "mean_over_subjects": self.row, "missing": self.missing, "sources": self.sources,
            "published": [{"method": r.method, "protocol": r.protocol(), "source": r.source} | r.metrics for r in self.published],
            "other_presets": [{"method": r.method, "protocol": r.protocol(), "reason": why} | r.metrics for r, why in self.other_presets],
        }


def _read(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: pass the eval.json files `havir eval` wrote (one per subject)")
    try:
        record = json.loads(path.read_text())
        protocol = record["protocol"]
        return {"path": str(path), "preset": protocol["preset"], "subject": protocol["data"]["subject"],
                "sessions": protocol["data"]["sessions"], "images": record["n"], "method": protocol.get("method", "unknown"),
                # eval.json files written before --normalisation existed were all z-scored with training statistics
                "normalisation": protocol["data"].get("normalisation", "training"), "metrics": record["metrics"]}
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(
            f"{path} is not an eval.json of this havir ({type(err).__name__}: {err}): score the folder again with `havir eval`"
        ) from None


def subject_table(paths: Sequence[Path], *, method: str | None = None) -> SubjectTable:
    """Average the runs in ``paths`` (``eval.json`` files or their folders), one per subject.

    ``method`` replaces the recorded method's name in the output (a label only: the recorded
    methods must still agree). Raises :class:`~havir.errors.InvalidInputError` for runs that
    cannot be averaged.
    """
    if not paths:
        raise InvalidInputError("no eval.json given: pass one per subject, e.g. subj01/eval/eval.json subj02/eval/eval.json")
    runs = [_read(path) for path in paths]
    for key, what in (("preset", "protocol presets"), ("images", "image counts"), ("sessions", "session counts"),
                      ("method", "methods"), ("normalisation", "voxel normalisations")):
        values = {str(run[key]) for run in runs}
        if len(values) > 1:
            found = ", ".join(f"{Path(run['path']).parent}: {run[key]}" for run in runs)
            raise InvalidInputError(f"cannot average runs of different {what} ({found}): score every subject the same way")
    subjects = [int(run["subject"]) for run in runs]
    twice = sorted({s for s in subjects if subjects.count(s) > 1})
    if twice:
        raise InvalidInputError(f"subject {twice[0]} is given twice: pass one eval.json per subject")
    common = [name for name in PROTOCOL_NAMES if all(name in run["metrics"] for run in runs)]
    row = {name: sum(run["metrics"][name] for run in runs) / len(runs) for name in common}
    preset = runs[0]["preset"]
    same, apart = published_rows(preset)
    return SubjectTable(
        method=method or runs[0]["method"], preset=preset, subjects=subjects, images=runs[0]["images"],
        sessions=runs[0]["sessions"], row=row, missing=[name for name in PROTOCOL_NAMES if name not in common],
        published=same, other_presets=apart, sources=[run["path"] for run in runs],
    )


def _cell(name: str, value: float | None) -> str:
    """A published table's notation: PixCorr/SSIM/distances to 3 decimals, identification in %."""
    return metric_record(name).format(value)


def table_rows(table: SubjectTable) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the published rows of the preset, then this run's mean."""
    subjects = "/".join(str(s) for s in table.subjects)
    header = ["method", *(metric_record(name).column for name in PROTOCOL_NAMES), "protocol"]
    rows = [[row.method, *(_cell(n, row.metrics.get(n)) for n in PROTOCOL_NAMES), row.protocol()] for row in table.published]
    ours = (f"{table.preset} preset; subjects {subjects} (mean), {table.sessions} sessions, {table.images} test images")
    rows.append([table.method, *(_cell(n, table.row.get(n)) for n in PROTOCOL_NAMES), ours])
    return header, rows


def render(table: SubjectTable, style: str) -> str:
    """The table as ``markdown``, ``csv`` or ``latex`` text."""
    header, rows = table_rows(table)
    if style == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    if style == "latex":
        def tex(text: str) -> str:
            return "".join(_TEX_SPECIAL.get(char, char) for char in text)

        body = [" & ".join(tex(cell) for cell in row[:-1]) + r" \\" for row in rows]
        return "\n".join([r"\begin{tabular}{l" + "r" * len(PROTOCOL_NAMES) + "}", r"\hline",
                          " & ".join(tex(h) for h in header[:-1]) + r" \\", r"\hline", *body, r"\hline", r"\end{tabular}"]) + "\n"
    raise InvalidInputError(f"--format must be markdown, csv or latex, got {style!r}")
