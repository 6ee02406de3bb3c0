"""The demo world's own measures of what a reconstruction shows: DEMO MEASURES, never protocol metrics.

The protocol's metrics need networks the demo cannot download, and its pixel metrics cannot tell
a scene with the right objects from one with the right colours. The demo world has two readers
trained on its scenes that can:

* the **scene probe** (:mod:`havir.demo_world.probe`): *content accuracy* (the background read
  from the reconstruction is the stimulus's; chance 25%) and *object-kind F1* (the object kinds
  present);
* the **miniature CLIP** (:mod:`havir.demo_world.clip`): *mini-CLIP identification*, two-way
  identification (as the protocol's CLIP metric) on its pooled image embeddings; chance 50%.

Each is per image, so intervals and comparisons are computed as for the protocol's metrics.
"""

from __future__ import annotations

import numpy as np

from havir.demo_world.clip import DemoClip, embed_images, load_demo_clip
from havir.demo_world.probe import SceneProbe, content_agreement, load_scene_probe
from havir.metrics.scores import bootstrap_interval, two_way_identification

#: Name -> (title, chance level) of each demo measure.
DEMO_MEASURES: dict[str, tuple[str, float | None]] = {
    "content_accuracy": ("content accuracy (background)", 0.25),
    "object_kind_f1": ("object-kind F1", None),
    "mini_clip_identification": ("mini-CLIP identification", 0.5),
}


def demo_measures(
    stimuli: np.ndarray, reconstructions: np.ndarray, *, probe: SceneProbe | None = None, clip: DemoClip | None = None
) -> dict[str, np.ndarray]:
    """Per-image demo measures, float (n,) each, between ``reconstructions`` and their ``stimuli``.

    ``stimuli``, ``reconstructions``: uint8 (n, h, w, 3), row i reconstructing stimulus i (any
    sides: each reader resizes).
    """
    probe = probe or load_scene_probe()
    clip = clip or load_demo_clip()
    content = content_agreement(stimuli, reconstructions, probe)
    identification = two_way_identification(embed_images(clip, stimuli).numpy(), embed_images(clip, reconstructions).numpy())
    return {
        "content_accuracy": content["background_correct"],
        "object_kind_f1": content["object_kind_f1"],
        "mini_clip_identification": identification,
    }


def summarise(per_image: dict[str, np.ndarray], *, seed: int = 0) -> dict[str, dict[str, float | list[float]]]:
    """Mean and 95% bootstrap interval of each per-image measure."""
    return {
        name: {"mean": round(float(np.mean(values)), 4),
               "interval": [round(bound, 4) for bound in bootstrap_interval(values, seed=seed)]}
        for name, values in per_image.items()
    }
