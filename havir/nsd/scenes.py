"""Procedural scenes for the synthetic NSD: a background and one to three objects, with captions.

The scenes are simple on purpose: each has a known *layout* (where things are, their colours and
contrast: what early visual cortex encodes) and known *content* (which objects, how many, of what
category: what higher visual cortex encodes), so a simulated brain can encode each exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Object kinds and the category-selective region that prefers each (NSD's floc localisers).
KINDS: dict[str, str] = {
    "face": "faces",
    "person": "bodies",
    "house": "places",
    "tree": "places",
    "car": "objects",
    "ball": "objects",
    "box": "objects",
    "sign": "words",
}
CATEGORIES = ("faces", "bodies", "places", "objects", "words")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "orange": (240, 135, 30),
    "purple": (135, 60, 175),
}
#: Backgrounds: name -> (top colour, bottom colour, caption phrase).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], str]] = {
    "meadow": ((135, 190, 235), (70, 140, 60), "in a meadow under a blue sky"),
    "beach": ((150, 200, 240), (225, 200, 140), "on a sandy beach"),
    "room": ((200, 190, 170), (120, 90, 60), "in a room with a wooden floor"),
    "night": ((20, 20, 60), (45, 45, 55), "at night"),
}
MAX_OBJECTS = 3
_NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    """One object: its kind, colour, centre (x, y as fractions of the image) and size (fraction)."""

    kind: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: a background and 1..3 objects at random places, sizes and colours."""
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    objects = tuple(
        SceneObject(
            kind=str(rng.choice(list(KINDS))),
            colour=str(rng.choice(list(COLOURS))),
            x=float(rng.uniform(0.2, 0.8)),
            y=float(rng.uniform(0.25, 0.8)),
            size=float(rng.uniform(0.18, 0.38)),
        )
        for _ in range(n_objects)
    )
    return Scene(background=str(rng.choice(list(BACKGROUNDS))), objects=objects)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.size * side / 2
    fill = COLOURS[obj.colour]
    dark = tuple(c // 3 for c in fill)
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.kind == "face":
        draw.ellipse(box, fill=fill, outline=dark)
        for dx in (-0.35, 0.35):
            e = 0.12 * r
            draw.ellipse((cx + dx * r - e, cy - 0.25 * r - e, cx + dx * r + e, cy - 0.25 * r + e), fill=dark)
        draw.arc((cx - 0.5 * r, cy - 0.2 * r, cx + 0.5 * r, cy + 0.55 * r), 20, 160, fill=dark, width=max(1, side // 128))
    elif obj.kind == "person":
        head = 0.28 * r
        draw.ellipse((cx - head, cy - r, cx + head, cy - r + 2 * head), fill=fill)
        draw.rectangle((cx - 0.35 * r, cy - r + 2 * head, cx + 0.35 * r, cy + 0.3 * r), fill=fill)
        draw.rectangle((cx - 0.3 * r, cy + 0.3 * r, cx - 0.08 * r, cy + r), fill=dark)
        draw.rectangle((cx + 0.08 * r, cy + 0.3 * r, cx + 0.3 * r, cy + r), fill=dark)
    elif obj.kind == "house":
        draw.rectangle((cx - 0.8 * r, cy - 0.1 * r, cx + 0.8 * r, cy + r), fill=fill)
        draw.polygon([(cx - r, cy - 0.1 * r), (cx + r, cy - 0.1 * r), (cx, cy - r)], fill=dark)
    elif obj.kind == "tree":
        draw.rectangle((cx - 0.15 * r, cy, cx + 0.15 * r, cy + r), fill=(100, 60, 30))
        draw.ellipse((cx - 0.8 * r, cy - r, cx + 0.8 * r, cy + 0.3 * r), fill=fill)
    elif obj.kind == "car":
        draw.rectangle((cx - r, cy - 0.2 * r, cx + r, cy + 0.5 * r), fill=fill)
        draw.rectangle((cx - 0.5 * r, cy - 0.6 * r, cx + 0.5 * r, cy - 0.2 * r), fill=fill)
        for dx in (-0.55, 0.55):
            w = 0.25 * r
            draw.ellipse((cx + dx * r - w, cy + 0.5 * r - w, cx + dx * r + w, cy + 0.5 * r + w), fill=(20, 20, 20))
    elif obj.kind == "ball":
        draw.ellipse(box, fill=fill)
    elif obj.kind == "box":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill, outline=dark)
    elif obj.kind == "sign":
        draw.rectangle((cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r), fill=fill, outline=dark)
        for row in (-0.3, 0.0, 0.3):
            draw.line((cx - 0.75 * r, cy + row * r, cx + 0.75 * r, cy + row * r), fill=dark, width=max(1, side // 64))
    else:  # pragma: no cover - KINDS lists every kind drawn above
        raise ValueError(f"unknown object kind {obj.kind!r}")


def render_scene(scene: Scene, side: int) -> np.ndarray:
    """Render ``scene`` as a uint8 RGB image of shape (side, side, 3)."""
    top, bottom, _ = BACKGROUNDS[scene.background]
    fraction = np.linspace(0.0, 1.0, side)[:, None, None]
    horizon = np.where(fraction < 0.55, np.asarray(top), np.asarray(bottom))
    canvas = np.broadcast_to(horizon, (side, side, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(image)
    for obj in sorted(scene.objects, key=lambda o: o.y):  # nearer (lower) objects drawn last
        _draw_object(draw, obj, side)
    return np.asarray(image, dtype=np.uint8)


def _position(obj: SceneObject) -> str:
    horizontal = "left" if obj.x < 0.4 else "right" if obj.x > 0.6 else "middle"
    return f"on the {horizontal}" if horizontal != "middle" else "in the middle"


def describe_scene(scene: Scene, rng: np.random.Generator, n_captions: int = 5) -> list[str]:
    """``n_captions`` different captions of ``scene``, in the style of COCO's."""
    _, _, place = BACKGROUNDS[scene.background]
    phrases = [f"a {o.colour} {o.kind}" for o in scene.objects]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    count = _NUMBERS[len(scene.objects)]
    templates = [
        f"{listing.capitalize()} {place}.",
        f"A picture of {listing} {place}.",
        f"There {'is' if len(phrases) == 1 else 'are'} {count} {'thing' if len(phrases) == 1 else 'things'} {place}: {listing}.",
        " ".join(f"{p.capitalize()} {_position(o)}." for p, o in zip(phrases, scene.objects)),
        f"A simple scene {place} with {listing}.",
        f"{count.capitalize()} object{'s' if len(phrases) > 1 else ''} {place}, including {phrases[0]}.",
    ]
    order = rng.permutation(len(templates))[:n_captions]
    return [templates[i] for i in order]


def content_features(scene: Scene) -> np.ndarray:
    """What a scene contains, as a float vector (presence of each kind, category counts,
    number of objects one-hot, background one-hot): the variables higher visual cortex encodes."""
    kinds = [o.kind for o in scene.objects]
    presence = [float(kind in kinds) for kind in KINDS]
    categories = [float(sum(KINDS[k] == c for k in kinds)) for c in CATEGORIES]
    number = [float(len(kinds) == n) for n in range(1, MAX_OBJECTS + 1)]
    background = [float(scene.background == b) for b in BACKGROUNDS]
    return np.asarray(presence + categories + number + background, dtype=np.float64)
