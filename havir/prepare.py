"""``havir prepare``: one subject's NSD release -> one training-ready HDF5 file.

What it does, in order: build the subject's structural and semantic masks; read each session's
betas for the masked voxels only (HDF5 where present, else NIfTI), as percent signal change;
label each trial with its image (``nsdId``), repetition and split (test iff the image is one of
the shared images); z-score every voxel with the mean and standard deviation of the *training*
trials only (``normalisation="training"``: of all sessions together; ``"session"``: of each
session's own training trials, which removes session-to-session drift); join each image's COCO
captions; copy the test stimuli, for evaluation.

Memory stays near one session's masked data: sessions stream, as read, into a hidden resumable
file (``.subjXX.h5.partial``, checksummed chunks), statistics are merged session by session, and
the z-scoring is a second pass, in blocks, from that file into the output under a temporary name.
The raw file is never modified in place after its sessions are recorded, so a run killed at any
point and started again with the same inputs continues after the last finished session and ends
with the same arrays; the output and its record are committed by renames (see :mod:`havir.io`),
the raw file deleted last.

Output, ``OUT/subjXX.h5`` (``n`` = trials of a split, ``v`` = voxels of a set):

=================================  ==========================================================
``train/structural`` (n, v)        float32 z-scored betas of the structural voxels
``train/semantic`` (n, v)          float32 z-scored betas of the semantic voxels
``train/other`` (n, v)             float32 z-scored betas of the nsdgeneral voxels in neither set
                                   (all three: every nsdgeneral voxel, the ridge baseline's input)
``train/nsd_id`` (n,)              int64 0-based 73k image id of each trial
``train/repetition`` (n,)          int8 0, 1, 2: which showing of the image
``train/session`` (n,)             int16 1-based session
``test/...``                       the same for the test trials
``test/stimuli`` (m, s, s, 3)      uint8 test images, ascending ``nsdId``
``test/stimulus_nsd_id`` (m,)      their ids
``captions/nsd_id``, ``/text``     one row per caption of every image the subject saw
``voxels/structural`` (v, 3)       (x, y, z) index of each column on the functional grid
``normalisation/*_mean``, ``_std``  the training statistics used (percent signal change), (v,);
                                   with ``"session"`` instead ``normalisation/session_*_mean``,
                                   ``_std`` (n_sessions, v), row ``k`` for session ``k + 1``;
                                   the attribute ``method`` says which
=================================  ==========================================================

plus ``OUT/subjXX.json`` recording the protocol (sessions, counts, mask definition and hash,
versions).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import h5py
import numpy as np

import havir
from havir.artifacts.prepared import (  # noqa: F401 (the prepared file's names, also read here by their old path)
    FORMAT_VERSION,
    NORMALISATIONS,
    PreparedSubject,
    load_split,
    prepared_normalisation,
    prepared_path,
    prepared_record_path,
    reading_prepared,
)
from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, check_free_space, flush_h5, open_h5, output_folder, package_versions
from havir.masks import build_masks, definition_for
from havir.nsd.betas import BetasFile, gzip_inflater, open_betas, read_masked_betas
from havir.nsd.design import load_design, subject_trials
from havir.nsd.layout import NSDLayout, check_subject
from havir.nsd.stimuli import iter_stimuli, read_captions, read_stim_info, stimulus_side
from havir.options import PREPARE_OPTIONS
from havir.progress import track
from havir.validation import check_options

_SETS = ("structural", "semantic", "other")
_ROWS_PER_BLOCK = 512  # rows z-scored per block in the second pass
_CONSTANT_RULE = "a voxel with std 0 over those trials gets std 1: its training values become 0"


def _choose_files(layout: NSDLayout, subject: int, sessions: int | None, betas_format: str) -> list[BetasFile]:
    on_disk = layout.sessions_on_disk(subject)
    available = len(on_disk)
    contiguous = 0
    while contiguous + 1 in on_disk:
        contiguous += 1
    wanted = contiguous if sessions is None else sessions
    if sessions is not None and (sessions < 1 or sessions > contiguous):
        raise InvalidInputError(
            f"--sessions {sessions} asks for more sessions than subj{subject:02d} has: sessions 1..{contiguous} "
            f"are on disk in {layout.betas_dir(subject)} ({available} files in all); pass --sessions 1..{contiguous}"
        )
    if contiguous == 0:
        raise MissingInputError(
            f"subj{subject:02d} has no betas_session01 in {layout.betas_dir(subject)}: sessions must start at 01"
        )
    files = []
    for session in range(1, wanted + 1):
        formats = on_disk[session]
        if betas_format == "auto":
            fmt = "hdf5" if "hdf5" in formats else "nifti"  # HDF5 chunks let us read masked voxels only
        elif betas_format in formats:
            fmt = betas_format
        else:
            raise MissingInputError(
                f"no {betas_format} betas for session {session:02d} of subj{subject:02d} in "
                f"{layout.betas_dir(subject)}: use --betas-format auto"
            )
        files.append(open_betas(formats[fmt], fmt))
    return files


def _moments(block: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) of each column of ``block``, in float64."""
    block = block.astype(np.float64)
    if len(block) == 0:
        return 0, np.zeros(block.shape[1]), np.zeros(block.shape[1])
    mean = block.mean(axis=0)
    return len(block), mean, ((block - mean) ** 2).sum(axis=0)


def _merge_moments(a, b):
    """Chan et al.'s parallel merge of two (count, mean, sum of squared deviations)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    total = n_a + n_b
    if total == 0:
        return a
    delta = mean_b - mean_a
    return total, mean_a + delta * (n_b / total), m2_a + m2_b + delta**2 * (n_a * n_b / total)


def _fingerprint(subject: int, files: list[BetasFile], definition_sha256: str, captions_dir: Path) -> str:
    """What a partial output was computed from; a run resumes only when it is unchanged.

    The normalisation is not part of it: the raw file holds unnormalised betas and every
    session's moments, so a run resumed with the other normalisation reuses it unchanged.
    """
    sources = [[str(b.path.resolve()), b.fmt, b.path.stat().st_size, b.path.stat().st_mtime_ns] for b in files]
    return json.dumps({"subject": subject, "format": FORMAT_VERSION, "betas": sources,
                       "definition": definition_sha256, "captions": str(Path(captions_dir).resolve())})


def _create_raw_layout(h5, subject, trials, split_of, n_rows, voxels, fingerprint) -> None:
    """The resumable file: unnormalised betas by split and set, filled session by session."""
    h5.attrs.update(format_version=FORMAT_VERSION, subject=subject, fingerprint=fingerprint, sessions_done=0)
    for split, rows in split_of.items():
        group = h5.create_group(split)
        for name in _SETS:
            n_voxels = len(voxels[name])
            chunk_rows = max(1, min(32, n_rows[split]))
            if n_voxels:  # checksummed: a chunk damaged by a kill is detected on resume, never trusted
                group.create_dataset(name, (n_rows[split], n_voxels), np.float32, chunks=(chunk_rows, n_voxels), fletcher32=True)
            else:  # an empty set (no nsdgeneral voxel outside both masks) cannot be chunked
                group.create_dataset(name, (n_rows[split], 0), np.float32)


def _resumable_sessions(partial: Path, fingerprint: str) -> int:
    """Sessions a partial file holds intact (0: none there, other inputs, or damaged)."""
    try:
        with h5py.File(partial, "r") as h5:
            if h5.attrs.get("fingerprint") != fingerprint:
                return 0
            done = int(h5.attrs["sessions_done"])
            for split in ("train", "test"):
                for name in _SETS:
                    dataset = h5[split][name]
                    for start in range(0, dataset.shape[0], _ROWS_PER_BLOCK):
                        dataset[start : start + _ROWS_PER_BLOCK]  # reading verifies the checksums
            for index in range(done):
                for name in _SETS:
                    h5[f"session_moments/{index:02d}/{name}"][()]
            return done
    except (OSError, KeyError, ValueError):  # damaged by the interruption: start again
        return 0


def _masked_sessions(files: list[BetasFile], voxels: np.ndarray, workers: int) -> Iterator[np.ndarray]:
    """Each session's masked betas (n_trials, n_voxels), in the order of ``files``.

    With ``workers`` > 1 the sessions are read in a pool of that many processes (started with
    ``spawn``: safe whatever threads the parent runs), while the caller writes the one before.
    At most ``workers`` sessions are read or waiting ahead of the one the caller holds, so
    memory stays near ``workers + 1`` sessions' masked data however slow the writing is.
    """
    if workers == 1:
        for betas in files:
            yield read_masked_betas(betas, voxels)
        return
    upcoming = iter(files)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead = deque(pool.submit(read_masked_betas, betas, voxels) for betas in islice(upcoming, workers))
        try:
            while ahead:
                session_betas = ahead.popleft().result()
                ahead.extend(pool.submit(read_masked_betas, betas, voxels) for betas in islice(upcoming, 1))
                yield session_betas
        finally:  # an error or interruption: drop what has not started; running reads finish
            for future in ahead:
                future.cancel()


def _stream_sessions(h5, files, resumed, both, split_of, n_voxels, subject, progress, workers) -> None:
    """Pass 1: each session's masked betas into the file; its training moments beside them.

    ``sessions_done`` is recorded after the session's data is flushed, so a kill leaves it at the
    last session wholly written; the next session's rows are simply written again. Sessions are
    read by ``workers`` processes (:func:`_masked_sessions`) but written here, in order.
    """
    ends = np.cumsum([n_voxels[name] for name in _SETS])
    columns = {name: slice(end - n_voxels[name], end) for name, end in zip(_SETS, ends)}
    first = sum(b.n_trials for b in files[:resumed])
    written = {split: int(rows[:first].sum()) for split, rows in split_of.items()}
    indices = track(range(resumed, len(files)), f"subj{subject:02d}: reading sessions", total=len(files) - resumed, enabled=progress, unit="sessions")
    with closing(_masked_sessions(files[resumed:], both, workers)) as sessions:  # an error stops the readers
        for index, session_betas in zip(indices, sessions):
            betas = files[index]
            session_rows = slice(first, first + betas.n_trials)
            first += betas.n_trials
            moments = h5.require_group(f"session_moments/{index:02d}")
            for split, rows in split_of.items():
                selected = session_betas[rows[session_rows]]
                start, stop = written[split], written[split] + len(selected)
                for name, part in columns.items():
                    h5[split][name][start:stop] = selected[:, part]
                    if split == "train":
                        count, mean, m2 = _moments(selected[:, part])
                        if name in moments:  # left by a run killed before it recorded this session
                            del moments[name]
                        moments[name] = np.stack([mean, m2])
                        moments.attrs["count"] = count
                written[split] = stop
            flush_h5(h5)
            h5.attrs["sessions_done"] = index + 1
            flush_h5(h5)


def _z_statistics(count: int, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std with ddof=0, which voxels are constant) of one set of moments; a voxel with no
    variance carries no signal, so its std is 1 and it stays at 0 (its training values)."""
    std = np.sqrt(m2 / max(count, 1))
    constant = std == 0
    std[constant] = 1.0
    return mean, std, constant


def _write_normalised(raw, h5, subject: int, voxels, trials, split_of, normalisation: str) -> None:
    """Pass 2: the output file, every voxel z-scored with training moments (test trials never
    enter them), read in blocks from the raw file ``raw``, which is left untouched.

    ``normalisation="training"`` merges every session's moments into one mean and std per voxel;
    ``"session"`` z-scores each row with its own session's (``trials.session`` picks the row
    of the (n_sessions, v) statistics).
    """
    h5.attrs.update(format_version=FORMAT_VERSION, subject=subject, havir_version=havir.__version__)
    for name in _SETS:
        h5[f"voxels/{name}"] = voxels[name].astype(np.int16)
    for split, rows in split_of.items():
        for key in ("nsd_id", "repetition", "session"):
            h5[f"{split}/{key}"] = getattr(trials, key)[rows]
    sessions = [raw[f"session_moments/{index:02d}"] for index in range(int(raw.attrs["sessions_done"]))]
    group = h5.require_group("normalisation")
    group.attrs["method"] = normalisation
    for name in _SETS:
        per_session = [(int(session.attrs["count"]), *session[name][()]) for session in sessions]
        if normalisation == "training":
            moments = (0, 0.0, 0.0)
            for session_moments in per_session:
                moments = _merge_moments(moments, session_moments)
            mean, std, constant = _z_statistics(*moments)
            prefix = ""
        else:
            mean, std, constant = (np.stack(column) for column in zip(*(_z_statistics(*m) for m in per_session)))
            prefix = "session_"
        group[f"{prefix}{name}_mean"] = mean.astype(np.float32)
        group[f"{prefix}{name}_std"] = std.astype(np.float32)
        group.attrs[f"{prefix}{name}_constant_voxels"] = int(constant.sum())  # (session, voxel) pairs with "session"
        for split, rows in split_of.items():
            source = raw[split][name]
            session_index = trials.session[rows].astype(np.int64) - 1
            dataset = h5[split].create_dataset(name, source.shape, np.float32, chunks=source.chunks)
            for start in range(0, dataset.shape[0], _ROWS_PER_BLOCK):
                block = source[start : start + _ROWS_PER_BLOCK].astype(np.float64)
                if normalisation == "training":
                    dataset[start : start + _ROWS_PER_BLOCK] = ((block - mean) / std).astype(np.float32)
                else:
                    index = session_index[start : start + _ROWS_PER_BLOCK]
                    dataset[start : start + _ROWS_PER_BLOCK] = ((block - mean[index]) / std[index]).astype(np.float32)


def _check_sessions_have_training_trials(trials, n_sessions: int, subject: int) -> None:
    """Per-session z-scoring needs training trials in every session (real NSD sessions hold
    about 680 of their 750); a session of test trials only has no statistics of its own."""
    counts = np.bincount(trials.session[~trials.is_test], minlength=n_sessions + 1)[1:]
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise InvalidInputError(
            f"--normalisation session z-scores each session with its training trials, but session {empty[0] + 1:02d} "
            f"of subj{subject:02d} has none (only test trials): use --normalisation training, or --sessions to leave it out"
        )


def _write_stimuli_and_captions(h5, layout, test_ids, side, captions) -> None:
    h5.create_dataset("test/stimuli", (len(test_ids), side, side, 3), np.uint8, chunks=(1, side, side, 3))
    for ids, images in iter_stimuli(layout.stimuli, test_ids):
        start = int(np.searchsorted(test_ids, ids[0]))
        h5["test/stimuli"][start : start + len(ids)] = images
    h5["test/stimulus_nsd_id"] = test_ids
    caption_ids = np.concatenate([[i] * len(captions[i]) for i in sorted(captions)]).astype(np.int64)
    h5["captions/nsd_id"] = caption_ids
    h5.create_dataset("captions/text", data=[c for i in sorted(captions) for c in captions[i]], dtype=h5py.string_dtype())


def prepare_subject(
    nsd_root: Path,
    subject: int,
    out: Path,
    *,
    sessions: int | None = None,
    definition: Path | None = None,
    betas_format: str = "auto",
    captions_dir: Path | None = None,
    normalisation: str = "training",
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Prepare one subject; returns the summary that ``havir prepare --json`` prints.

    Parameters
    ----------
    nsd_root : folder mirroring the NSD release.
    subject : NSD subject, 1..8.
    out : output folder; receives ``subjXX.h5`` and ``subjXX.json``.
    sessions : read sessions 1..``sessions`` (default: all on disk). The anchors used 37 (a test
        set of 982 images) or 40 (1000 images); results of the two are not comparable.
    definition : mask definition TOML (default: ``masks/subjXX.toml``).
    betas_format : ``"auto"`` (HDF5 where present, else NIfTI), ``"hdf5"`` or ``"nifti"``.
    captions_dir : folder with COCO's ``captions_*2017.json`` (default: where NSD's code looks).
    normalisation : ``"training"`` (z-score with the training trials of all sessions pooled) or
        ``"session"`` (with each session's own training trials: removes session-to-session drift;
        every session read must hold training trials). See :data:`NORMALISATIONS`.
    workers : processes reading sessions side by side (1: read here). The output is the same
        for any count; memory grows by about one session's masked data (47 MB for 15,724 voxels)
        and one reader's working set per worker.
    progress : show a progress bar on stderr.
    """
    started = time.perf_counter()
    check_subject(subject)
    check_options(PREPARE_OPTIONS, sessions=sessions, betas_format=betas_format, normalisation=normalisation, workers=workers)
    layout = NSDLayout(nsd_root)
    layout.check_root()
    files = _choose_files(layout, subject, sessions, betas_format)
    mask_definition = definition_for(subject, definition)
    masks = build_masks(layout, subject, mask_definition)
    for betas in files:
        if betas.grid != masks.grid:
            raise InvalidInputError(
                f"ROI grid {masks.grid} does not match betas grid {betas.grid} of {betas.path.name} for "
                f"subj{subject:02d}: were the ROIs taken from another subject or resolution (func1pt8mm expected)?"
            )
    design = load_design(layout.expdesign)
    trials = subject_trials(design, subject, [b.n_trials for b in files])
    if normalisation == "session":
        _check_sessions_have_training_trials(trials, len(files), subject)
    stim_info = read_stim_info(layout.stim_info)
    captions = read_captions(stim_info, trials.nsd_id, captions_dir or layout.annotations_dir)
    side = stimulus_side(layout.stimuli)

    voxels = {name: masks.voxels(name) for name in _SETS}
    n_voxels = {name: len(v) for name, v in voxels.items()}
    both = np.concatenate([voxels[name] for name in _SETS])
    split_of = {"train": ~trials.is_test, "test": trials.is_test}
    n_rows = {split: int(rows.sum()) for split, rows in split_of.items()}

    inflater = gzip_inflater().name  # how .nii.gz betas are decompressed (same bytes either way)
    fast_inflater = ["isal"] if inflater == "isal_zlib" else []
    stem = f"subj{subject:02d}"
    test_ids = np.unique(trials.nsd_id[trials.is_test])
    fingerprint = _fingerprint(subject, files, mask_definition.sha256(), captions_dir or layout.annotations_dir)
    with output_folder(Path(out), scope=stem) as out:  # subjects may be prepared side by side
        h5_path, record_path = prepared_path(out, subject), prepared_record_path(out, subject)
        # Sessions stream into a raw file that survives an interruption: run the same command
        # again and it continues after the last finished session.
        partial = out / f".{stem}.h5.partial"
        resumed = _resumable_sessions(partial, fingerprint)
        if resumed == 0:
            partial.unlink(missing_ok=True)
        data_bytes = 4 * sum(n_rows.values()) * sum(n_voxels.values())
        done_bytes = partial.stat().st_size if partial.exists() else 0
        needed = 2 * data_bytes + len(test_ids) * side * side * 3 + 2**20 - done_bytes  # raw + output (+ metadata)
        check_free_space(out, needed)
        summary = {
            "subject": subject,
            "sessions": len(files),
            "train_images": int(np.unique(trials.nsd_id[~trials.is_test]).size),
            "test_images": int(test_ids.size),
            "train_trials": n_rows["train"],
            "test_trials": n_rows["test"],
            "structural_voxels": n_voxels["structural"],
            "semantic_voxels": n_voxels["semantic"],
            "other_voxels": n_voxels["other"],
            "betas_formats": sorted({b.fmt for b in files}),
            "resumed_sessions": resumed,
            "output": str(h5_path),
        }
        record = summary | {
            "format_version": FORMAT_VERSION,
            "protocol": {
                "sessions_read": list(range(1, len(files) + 1)),
                "trials_per_session": [b.n_trials for b in files],
                "test_rule": f"image is one of the {design.n_shared} shared images (sharedix), k <= {design.n_shared}",
                "normalisation": {"method": normalisation, "rule": NORMALISATIONS[normalisation], "constant_voxels": _CONSTANT_RULE},
                "betas_unit": "percent signal change (stored int16 / 300)",
                "betas": "betas_fithrf_GLMdenoise_RR, func1pt8mm",
                "note": "results from different session counts (37 vs 40) are not comparable",
            },
            "masks": masks.summary() | {"definition_content": mask_definition.to_dict()},
            "nsd_root": str(Path(nsd_root).resolve()),
            "stimulus_side": side,
            "versions": package_versions("numpy", "h5py", "nibabel", "scipy", "pandas", *fast_inflater)
            | {"gzip_inflater": inflater},
        }
        try:
            with open_h5(partial, "a", needed=needed) as h5:
                if resumed == 0:
                    _create_raw_layout(h5, subject, trials, split_of, n_rows, voxels, fingerprint)
                _stream_sessions(h5, files, resumed, both, split_of, n_voxels, subject, progress, workers)

            # Commit order: the old record goes first, then the file, then its record, then the raw
            # file. A kill anywhere leaves no file beside a record of another; the raw file, kept
            # until the end, makes the rerun redo only the second pass.
            with atomic_path(record_path) as record_temporary, atomic_path(h5_path) as h5_temporary:
                with h5py.File(partial, "r") as raw, open_h5(h5_temporary, "w", needed=needed) as h5:
                    _write_normalised(raw, h5, subject, voxels, trials, split_of, normalisation)
                    _write_stimuli_and_captions(h5, layout, test_ids, side, captions)
                summary["seconds"] = round(time.perf_counter() - started, 3)
                record_temporary.write_text(json.dumps(record | {"seconds": summary["seconds"]}, indent=2) + "\n")
                record_path.unlink(missing_ok=True)
        except (ValueError, OSError):  # bad input or a full disk: nothing to resume from once it is fixed
            partial.unlink(missing_ok=True)
            raise
        partial.unlink()
    return summary
