"""Measure what cross-subject pretraining gives a new subject with one session, on the synthetic NSD.

Writes a synthetic release with subjects 1, 2 and 3, prepares subjects 1 and 2 in full and
subject 3 twice (session 1 alone, and every session; both z-scored per session, so that session
1's rows are the same in both), computes ``tiny`` features, then trains:

* ``pre``: one model on subjects 1 and 2 (``havir train --subjects 1,2``); ``ctl``: the same on
  shuffled voxel-image pairs (``--control shuffled``), the null pretraining;
* ``adapted``: ``pre`` adapted to subject 3's one session (``havir train --subject 3 --init pre``,
  ``--epochs`` for the new input layers, ``--finetune-epochs`` for everything);
  ``adapted_ctl``: the same from ``ctl``;
* ``alone``: subject 3's one session alone (``havir train --subject 3``), as many epochs in all.

The one-session runs validate on a third of the session's training images and keep the epoch
that identifies them best (``best_by = "identification"``).

and scores each on the **held-out images**: every image subject 3 saw outside session 1
(averaged over its repetitions), far more than the one session's few test images, never in any
fit. Prints one JSON object: two-way identification per target and model, and the gains of
``adapted`` and ``adapted_ctl`` over ``alone``.

    OMP_NUM_THREADS=1 python scripts/measure_cross_subject.py --out /tmp/cross [--sessions 4] [--images 200] [--noise 1.5] \
        [--seed 0] [--world-seed 11]

``--seed`` seeds every training run, ``--world-seed`` the simulated release (brains, images, design).
:func:`measure` does it all and returns the result (tests/test_cross_subject.py calls it).

A session holds 3 * images / sessions trials: change ``--images`` and ``--sessions`` together to give
the pretraining subjects more data while subject 3's one session stays as long.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from havir.artifacts.dataset import averaged_split, checked_inputs
from havir.artifacts.features_cache import reading_features
from havir.artifacts.prepared import load_split
from havir.artifacts.run import load_decoders
from havir.features import compute_features
from havir.nsd.synth import synthesize_nsd
from havir.prepare import prepare_subject
from havir.targets import TARGET_NAMES
from havir.train import TrainConfig, evaluate, train_subject, train_subjects


def held_out(every: Path, one: Path):
    """Subject 3's images outside its first session, averaged over repetitions (``every``'s rows)."""
    prepared, cache, ids = checked_inputs(every, 3)
    seen = np.unique(load_split(one / "subj03.h5", "train").nsd_id)
    with reading_features(cache) as h5:
        features = {name: h5[name][()].astype(np.float32) for name in TARGET_NAMES}
    parts = [load_split(prepared, split) for split in ("train", "test")]
    structural, semantic, nsd_id = (np.concatenate([getattr(p, k) for p in parts]) for k in ("structural", "semantic", "nsd_id"))
    keep = ~np.isin(nsd_id, seen)
    return averaged_split(structural[keep], semantic[keep], nsd_id[keep], features, ids)


def measure(out: Path, *, images: int = 200, sessions: int = 4, noise: float = 1.5, pretrain_epochs: int = 30,
            epochs: int = 60, finetune_epochs: int = 0, seed: int = 0, world_seed: int = 11) -> dict:
    """Everything :func:`main` does, into ``out``; returns what it prints: ``held_out_images``,
    ``identification`` {model: {target: score}} and ``gain_over_alone`` {adapted, adapted_ctl: {target: gain}}."""
    synthesize_nsd(out / "nsd", subjects=(1, 2, 3), images=images, seed=world_seed, sessions=sessions, betas_format="hdf5",
                   noise=noise)
    for subject, folder, only, normalisation in ((1, "pool", None, "training"), (2, "pool", None, "training"),
                                                 (3, "one", 1, "session"), (3, "every", None, "session")):
        prepare_subject(out / "nsd", subject, out / folder, sessions=only, normalisation=normalisation, progress=False)
        compute_features(out / folder, subject, model="tiny", progress=False)
    pretraining = TrainConfig(preset="tiny", epochs=pretrain_epochs, batch_size=64, learning_rate=2e-3, seed=seed,
                              checkpoint_minutes=60)
    # One session leaves a handful of validation images: take a third of them, and keep the epoch that
    # identifies them best (a frozen pretrained decoder's near-mean first predictions have the lowest loss).
    adapting = dataclasses.replace(pretraining, epochs=epochs, finetune_epochs=finetune_epochs, val_fraction=0.3,
                                   best_by="identification")
    runs = out / "runs"
    for name, control in (("pre", False), ("ctl", True)):
        train_subjects(out / "pool", (1, 2), runs / name, config=dataclasses.replace(pretraining, shuffle_control=control),
                       device="cpu", progress=False)
    train_subject(out / "one", 3, runs / "adapted", config=adapting, init=runs / "pre", device="cpu", progress=False)
    train_subject(out / "one", 3, runs / "adapted_ctl", config=adapting, init=runs / "ctl", device="cpu", progress=False)
    alone = dataclasses.replace(adapting, epochs=epochs + finetune_epochs, finetune_epochs=0)
    train_subject(out / "one", 3, runs / "alone", config=alone, device="cpu", progress=False)

    test = held_out(out / "every", out / "one")
    scores = {}
    for name in ("adapted", "adapted_ctl", "alone"):
        decoders = load_decoders(runs / name)
        measured = evaluate(decoders["structural"], decoders["semantic"], test, torch.device("cpu"))
        scores[name] = {target: round(measured[f"{target}_identification"], 3) for target in TARGET_NAMES}
    gains = {name: {t: round(scores[name][t] - scores["alone"][t], 3) for t in TARGET_NAMES} for name in ("adapted", "adapted_ctl")}
    return {"held_out_images": len(test.nsd_id), "identification": scores, "gain_over_alone": gains}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=4, help="sessions of subjects 1 and 2 (subject 3 has 3/4 as many)")
    parser.add_argument("--noise", type=float, default=1.5,
                        help="trial noise of every subject, percent signal change (synthesize_nsd's noise; signal is 1.5)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=60, help="input-layer epochs of --init runs")
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training seed (every run's)")
    parser.add_argument("--world-seed", type=int, default=11, help="synthesize_nsd's seed (the simulated brains and images)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.out, images=args.images, sessions=args.sessions, noise=args.noise, pretrain_epochs=args.pretrain_epochs,
                     epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed, world_seed=args.world_seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
