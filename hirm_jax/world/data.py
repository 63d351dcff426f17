"""The demo world: 32x32 RGB pictures of one object in one style, with English captions.

Every picture is a pure function of (seed, split, index), so any set of pictures can be
regenerated bit for bit. Objects and styles are drawn at 4x and box-downsampled.

    batch = sample(64, seed=0, split="train")           # WorldBatch(images, objects, styles)
    batch.images.shape, batch.images.dtype              # (64, 32, 32, 3) uint8
    caption("circle", "striped", TRAIN_TEMPLATES[0])    # 'a striped circle'

The world has neutral anchors of its own, `OBJECT_ANCHOR` ("blob") and `STYLE_ANCHOR`
("plain"): HiRM-S uses them as the super-category targets, and the judge recognises them as
classes, so a perfect erasure of "circle" into "blob" can score 1.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import minimum_filter

from hirm_jax.config_lib import ConfigError

OBJECTS = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "crescent", "arrow", "bolt")
STYLES = ("outline", "striped", "dotted", "checkered", "gradient", "shadowed", "hatched", "glowing")
OBJECT_ANCHOR = "blob"    # a wide ellipse: the generic "thing"
STYLE_ANCHOR = "plain"    # a flat fill: the generic "no style"
ALL_OBJECTS = OBJECTS + (OBJECT_ANCHOR,)   # the judge's object classes, in this order
ALL_STYLES = STYLES + (STYLE_ANCHOR,)      # the judge's style classes, in this order

# Every name a caption may use for a class. The first is the concept's own (its id); the LAST
# is held out: the world is trained on it, but no erasure prompt, config or template of the
# benchmark uses it, so erasing "heart" can be tested on "valentine".
NAMES = {
    "circle": ("circle", "round disc", "ring shape"),
    "square": ("square", "box", "quadrilateral"),
    "triangle": ("triangle", "three sided shape", "trigon"),
    "star": ("star", "pentagram", "five pointed star"),
    "cross": ("cross", "plus sign", "crucifix"),
    "heart": ("heart", "love heart", "valentine"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "crescent": ("crescent", "half moon", "sickle"),
    "arrow": ("arrow", "pointer", "arrowhead"),
    "bolt": ("bolt", "lightning", "thunderbolt"),
    "outline": ("outline", "outlined", "hollow"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "checkered": ("checkered", "checkerboard", "chequered"),
    "gradient": ("gradient", "faded", "ombre"),
    "shadowed": ("shadowed", "drop shadow", "shaded"),
    "hatched": ("hatched", "diagonally lined", "crosshatched"),
    "glowing": ("glowing", "neon", "luminous"),
    OBJECT_ANCHOR: (OBJECT_ANCHOR,),
    STYLE_ANCHOR: (STYLE_ANCHOR,),
}
N_NAMES = max(len(v) for v in NAMES.values())  # names per concept (the anchors have one)


def names(concept: str) -> tuple:
    """Every name of a class, its own first, the held-out one last (anchors have one)."""
    if concept not in NAMES:
        raise ValueError(f"concept must be one of {list(NAMES)} but is {concept!r}")
    return NAMES[concept]


def trained_names(concept: str) -> tuple:
    """The names erasure may use: all but the held-out last one."""
    return names(concept)[:-1] if len(names(concept)) > 1 else names(concept)


def heldout_name(concept: str) -> str:
    """The synonym no erasure prompt uses: it measures whether erasure generalizes."""
    return names(concept)[-1]


def name_of(concept: str, k: int) -> str:
    """Name number k (mod the number of names) of a class: captions cycle through all of them."""
    return names(concept)[k % len(names(concept))]


def name_key(k: int) -> str:
    """The key of name number k in per-name metrics: "own", "name_1", ..., "heldout_name"."""
    return "own" if k == 0 else "heldout_name" if k == N_NAMES - 1 else f"name_{k}"


def concept_kind(concept: str) -> str:
    """"object" or "style"; anything else is a ConfigError listing the world's concepts."""
    if concept in OBJECTS:
        return "object"
    if concept in STYLES:
        return "style"
    raise ConfigError(f"concept must be one of the world's objects {list(OBJECTS)} or styles {list(STYLES)}, "
                      f"but is {concept!r}")


TRAIN_TEMPLATES = (
    "a {style} {object}",
    "a picture of a {style} {object}",
    "a drawing of a {style} {object}",
    "an image of a {object} in {style} style",
    "a small {style} {object}",
    "one {style} {object}",
    "a {object} that is {style}",
    "a nice {style} {object}",
    "a {object}, {style}",
    "a {style} little {object} on a card",
)
# Never seen by the text encoder or the denoiser in training: for evaluation.
HELDOUT_TEMPLATES = (
    "a photo of a {style} {object}",
    "a rendering of a {object} in {style} style",
    "{style} {object}",
    "a {object} that looks {style}",
)
# Partial captions, only for the contrastive text-encoder training (positive for every
# picture of that object, or of that style).
OBJECT_ONLY_TEMPLATES = ("a {object}", "a picture of a {object}", "a drawing of a {object}")
STYLE_ONLY_TEMPLATES = ("something {style}", "a {style} thing", "a picture in {style} style")

SPLITS = {"train": 0, "eval": 1}
SIZE = 32
SCALE = 4  # supersampling factor

FOREGROUNDS = np.array([(220, 40, 40), (240, 140, 20), (210, 180, 20), (40, 160, 60),
                        (40, 90, 220), (150, 60, 200)], np.float32)
BACKGROUNDS = np.array([(245, 245, 245), (235, 230, 210), (215, 230, 240)], np.float32)
SHADOW = np.array((70, 70, 70), np.float32)


def super_category(concept: str) -> str:
    """The neutral anchor HiRM-S misdirects a concept onto: "blob" for objects, "plain" for styles."""
    if concept in OBJECTS:
        return OBJECT_ANCHOR
    if concept in STYLES:
        return STYLE_ANCHOR
    raise ValueError(f"concept must be one of {OBJECTS + STYLES} but is {concept!r}")


def _article(match: re.Match) -> str:
    word = match.group(2)
    return f"{match.group(1)}{'an' if word[0] in 'aeiou' else 'a'} {word}"


def caption(obj: str, style: str, template: str) -> str:
    """Fill a template, fixing the article ("a outline" -> "an outline")."""
    text = template.format(object=obj, style=style)
    return re.sub(r"(^|\s)an? (\w+)", _article, text)


def cell_captions(obj: str, style: str, templates=TRAIN_TEMPLATES) -> list:
    """Every caption of a cell: each template with each name of the object and of the style."""
    return [caption(a, b, t) for t in templates for a in names(obj) for b in names(style)]


@dataclasses.dataclass(frozen=True)
class WorldBatch:
    images: np.ndarray   # [N, 32, 32, 3] uint8
    objects: np.ndarray  # [N] int, index into ALL_OBJECTS
    styles: np.ndarray   # [N] int, index into ALL_STYLES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> "WorldBatch":
        return WorldBatch(self.images[index], self.objects[index], self.styles[index])


def _polygon(points, cx, cy, r):
    return [(cx + r * x, cy + r * y) for x, y in points]


def _star(n=5, outer=1.08, inner=0.46):
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles) + 0.08))


def _heart(points=64):
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x / 16.5, (y + 2.5) / 15.5))


_SHAPES = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.05), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "cross": [(-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
              (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3)],
    "heart": _heart(),
    "diamond": [(0.0, -1.1), (0.72, 0.0), (0.0, 1.1), (-0.72, 0.0)],
    "arrow": [(-1.0, -0.28), (0.15, -0.28), (0.15, -0.75), (1.05, 0.0), (0.15, 0.75), (0.15, 0.28),
              (-1.0, 0.28)],
    "bolt": [(0.0, -1.1), (-0.8, 0.25), (-0.12, 0.25), (-0.4, 1.1), (0.85, -0.35), (0.18, -0.35),
             (0.62, -1.1)],
}


def shape_mask(obj: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask at 4x resolution; (cx, cy, r) in 4x pixels."""
    canvas = Image.new("L", (SIZE * SCALE, SIZE * SCALE), 0)
    draw = ImageDraw.Draw(canvas)
    if obj == "circle":
        draw.ellipse([cx - 0.95 * r, cy - 0.95 * r, cx + 0.95 * r, cy + 0.95 * r], fill=255)
    elif obj == OBJECT_ANCHOR:
        draw.ellipse([cx - 1.1 * r, cy - 0.58 * r, cx + 1.1 * r, cy + 0.58 * r], fill=255)
    elif obj == "crescent":  # a disc with an offset disc cut out
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.2 * r, cy - 0.9 * r, cx + 1.3 * r, cy + 0.6 * r], fill=0)
    elif obj in _SHAPES:
        draw.polygon(_polygon(_SHAPES[obj], cx, cy, r), fill=255)
    else:
        raise ValueError(f"object must be one of {ALL_OBJECTS} but is {obj!r}")
    return np.asarray(canvas) > 127


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Erosion by a (2 * pixels + 1) square, edges replicated (as PIL's MinFilter, 20x faster)."""
    return minimum_filter(mask, size=2 * pixels + 1, mode="nearest")


_GRID = np.mgrid[0:SIZE * SCALE, 0:SIZE * SCALE]


def render(obj: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 uint8 picture; colours, size and position come from `rng`."""
    if style not in ALL_STYLES:
        raise ValueError(f"style must be one of {ALL_STYLES} but is {style!r}")
    fg = FOREGROUNDS[rng.integers(len(FOREGROUNDS))]
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    dark = fg * 0.35
    r = rng.uniform(9.5, 11.5) * SCALE
    cx, cy = (SIZE / 2 + rng.uniform(-2, 2, size=2)) * SCALE
    n = SIZE * SCALE
    yy, xx = _GRID
    mask = shape_mask(obj, cx, cy, r)
    img = np.broadcast_to(bg, (n, n, 3)).copy()
    if style == "outline":
        mask = mask & ~_erode(mask, 2 * SCALE)
        img[mask] = fg
    elif style == "striped":
        band = (yy // (3 * SCALE)) % 2 == 0
        img[mask & band] = fg
        img[mask & ~band] = dark
    elif style == "dotted":
        period, radius = 7 * SCALE, 1.8 * SCALE
        dots = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < radius ** 2
        img[mask & ~dots] = fg
        img[mask & dots] = dark
    elif style == "checkered":
        cell = ((xx // (4 * SCALE)) + (yy // (4 * SCALE))) % 2 == 0
        img[mask & cell] = fg
        img[mask & ~cell] = dark
    elif style == "gradient":
        rows = np.nonzero(mask.any(axis=1))[0]
        t = np.clip((yy - rows.min()) / max(rows.max() - rows.min(), 1), 0, 1)[..., None]
        light = fg + (255 - fg) * 0.6
        img = np.where(mask[..., None], dark * (1 - t) + light * t, img)
    elif style == "shadowed":
        shift = 3 * SCALE
        shadow = np.zeros_like(mask)
        shadow[shift:, shift:] = mask[:-shift, :-shift]
        img[shadow] = SHADOW
        img[mask] = fg
    elif style == "hatched":  # diagonal lines (striped is horizontal bands)
        band = ((xx + yy) // (2 * SCALE)) % 3 == 0
        img[mask & ~band] = fg
        img[mask & band] = dark
    elif style == "glowing":  # a bright fill inside a soft halo of its own colour
        halo = ~mask & ~_erode(~mask, 3 * SCALE)
        img[halo] = 0.5 * img[halo] + 0.5 * fg
        img[mask] = fg + (255 - fg) * 0.35
    else:  # plain
        img[mask] = fg
    small = img.reshape(SIZE, SCALE, SIZE, SCALE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)} but is {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def sample(n: int, seed: int = 0, split: str = "train", start: int = 0) -> WorldBatch:
    """Pictures start..start+n-1 of a split: object and style uniform over all classes."""
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    objects = np.empty(n, np.int64)
    styles = np.empty(n, np.int64)
    for i in range(n):
        rng = _rng(seed, split, start + i)
        objects[i] = rng.integers(len(ALL_OBJECTS))
        styles[i] = rng.integers(len(ALL_STYLES))
        images[i] = render(ALL_OBJECTS[objects[i]], ALL_STYLES[styles[i]], rng)
    return WorldBatch(images, objects, styles)


def render_cell(obj: str, style: str, seeds) -> np.ndarray:
    """Pictures of one (object, style) cell, one per seed: [len(seeds), 32, 32, 3] uint8."""
    return np.stack([render(obj, style, np.random.default_rng([int(s), 2])) for s in seeds])
