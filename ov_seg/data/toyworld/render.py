"""Procedural rendering of toy-world scenes: stuff textures, object shapes, captions.

Everything is driven by a ``numpy.random.Generator`` so a scene is a pure function of its seed.
"""

import math
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from .categories import COLORS, SHAPES, STUFF, is_unseen, thing_id, unseen_shapes

# ---------------------------------------------------------------------------------------------------------
# Stuff textures: a small bank per (stuff, size) built once, then random crops + colour jitter per
# scene.
# ---------------------------------------------------------------------------------------------------------
_BANK_SIZE = 4


def _noise(rng, size, scale):
    """Smooth value noise in [0, 1] of shape (size, size)."""
    small = rng.random((max(2, size // scale), max(2, size // scale))).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _texture(stuff: str, size: int, rng) -> np.ndarray:
    """One (size, size, 3) uint8 RGB texture of a stuff category."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if stuff == "grass":
        base = np.array([70, 140, 50], np.float32)
        img = base + (_noise(rng, size, 4)[..., None] - 0.5) * 60
        for _ in range(size // 2):  # blades
            x, y = rng.integers(0, size, 2)
            length = int(rng.integers(2, max(3, size // 16)))
            cv2.line(
                img,
                (int(x), int(y)),
                (int(x + rng.integers(-1, 2)), int(y - length)),
                (40, 100 + float(rng.integers(0, 60)), 30),
                1,
            )
    elif stuff == "sky":
        top, bottom = np.array([90, 140, 225], np.float32), np.array([175, 210, 245], np.float32)
        img = top + (bottom - top) * yy[..., None]
        clouds = np.clip(_noise(rng, size, 8) * 2.2 - 1.2, 0, 1)[..., None]
        img = img * (1 - clouds) + 250 * clouds
    elif stuff == "water":
        phase = rng.random() * 6.28
        waves = np.sin(yy * 40 + np.sin(xx * 9 + phase) * 2.0 + phase)
        img = np.array([30, 95, 150], np.float32) + waves[..., None] * np.array(
            [15, 25, 30], np.float32
        )
    elif stuff == "sand":
        img = np.array([215, 190, 135], np.float32) + (_noise(rng, size, 6)[..., None] - 0.5) * 30
        img = img + rng.normal(0, 12, (size, size, 1)).astype(np.float32)
    elif stuff == "wall":
        img = np.zeros((size, size, 3), np.float32) + np.array([165, 85, 60], np.float32)
        img = img + (_noise(rng, size, 3)[..., None] - 0.5) * 30
        brick_h = max(4, size // 10)
        for row, y in enumerate(range(0, size, brick_h)):
            img[y : y + 1] = (200, 195, 185)
            off = brick_h if row % 2 else 0
            for x in range(off, size, 2 * brick_h):
                img[y : y + brick_h, x : x + 1] = (200, 195, 185)
    else:
        raise KeyError(f"unknown stuff {stuff!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)
def texture_bank(stuff: str, size: int) -> np.ndarray:
    """(_BANK_SIZE, 2*size, 2*size, 3) uint8 textures, fixed by (stuff, size)."""
    rng = np.random.default_rng([STUFF.index(stuff), size, 7])
    return np.stack([_texture(stuff, 2 * size, rng) for _ in range(_BANK_SIZE)])


def stuff_patch(stuff: str, size: int, rng) -> np.ndarray:
    """A random (size, size, 3) crop of a bank texture with brightness jitter."""
    bank = texture_bank(stuff, size)
    k = rng.integers(0, len(bank))
    y, x = rng.integers(0, size, 2)
    patch = bank[k, y : y + size, x : x + size].astype(np.int16)
    patch = patch + rng.integers(-12, 13)
    return np.clip(patch, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------
def _regular(n, r, rot, start=0.0):
    a = start + rot + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(a) * r, np.sin(a) * r], 1)


def _star(r, rot):
    a = rot - math.pi / 2 + np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return np.stack([np.cos(a) * rad, np.sin(a) * rad], 1)


def _cross(r, rot):
    w = r * 0.38
    pts = np.array(
        [
            [-w, -r],
            [w, -r],
            [w, -w],
            [r, -w],
            [r, w],
            [w, w],
            [w, r],
            [-w, r],
            [-w, w],
            [-r, w],
            [-r, -w],
            [-w, -w],
        ],
        np.float64,
    )
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _heart(r, rot):
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1) * (r / 16.5)
    c, s = math.cos(rot * 0.25), math.sin(rot * 0.25)  # hearts stay roughly upright
    return pts @ np.array([[c, s], [-s, c]])


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Binary (size, size) bool mask of a shape centred at (cx, cy) with radius r and rotation
    rot."""
    m = np.zeros((size, size), np.uint8)
    shift = 4  # sub-pixel vertex precision
    if shape in ("circle", "ring"):
        cv2.circle(m, (int(cx * 16), int(cy * 16)), int(r * 16), 1, -1, cv2.LINE_8, shift)
        if shape == "ring":
            cv2.circle(
                m, (int(cx * 16), int(cy * 16)), int(r * 0.55 * 16), 0, -1, cv2.LINE_8, shift
            )
        return m.astype(bool)
    polys = {
        "square": lambda: _regular(4, r * 1.05, rot, math.pi / 4),
        "triangle": lambda: _regular(3, r * 1.1, rot, -math.pi / 2),
        "star": lambda: _star(r * 1.1, rot),
        "cross": lambda: _cross(r, rot),
        "heart": lambda: _heart(r, rot),
        "hexagon": lambda: _regular(6, r, rot),
    }
    pts = polys[shape]() + np.array([cx, cy])
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, shift)
    return m.astype(bool)


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------
ONE_STUFF = (
    "{L} on the {s}",
    "a photo of {L} on the {s}",
    "{s} with {L}",
    "there is {L} on the {s}",
    "a picture of {L}",
    "{L} in front of the {s}",
)
TWO_STUFF = (
    "{L} between the {s} and the {s2}",
    "a photo of {L} with {s} and {s2}",
    "{s} above {s2} with {L}",
)
OBJECT_CENTRIC = (
    "a photo of {L}",
    "{L}",
    "an image of {L}",
    "{L} on a plain background",
    "a close-up photo of {L}",
)
# every caption template of the toy world (scene and object-centric; hard negatives use the same):
# the captions datasets' "caption_templates" metadata (ov_seg.data.caption_content)
CAPTION_TEMPLATES = ONE_STUFF + TWO_STUFF + OBJECT_CENTRIC
_NUMBERS = {2: "two", 3: "three", 4: "four"}


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(names: List[str], rng) -> str:
    """'a red circle, two blue stars and a white ring' from a list of (possibly repeated) names."""
    counts: Dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    items = list(counts.items())
    rng.shuffle(items)
    parts = [f"{_article(n)} {n}" if k == 1 else f"{_NUMBERS[k]} {_plural(n)}" for n, k in items]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_caption(obj_names: List[str], stuff_names: List[str], rng) -> str:
    phrase = object_phrase(obj_names, rng)
    if len(stuff_names) == 2:
        t = TWO_STUFF[rng.integers(len(TWO_STUFF))]
        return t.format(L=phrase, s=stuff_names[0], s2=stuff_names[1])
    t = ONE_STUFF[rng.integers(len(ONE_STUFF))]
    return t.format(L=phrase, s=stuff_names[0])


def hard_negative_names(obj: List[Tuple[int, int]], rng) -> Optional[List[str]]:
    """Swap the shape of one object for another shape that forms a *seen* name; None if
    impossible."""
    if not obj:
        return None
    k = int(rng.integers(len(obj)))
    ci, si = obj[k]
    choices = [s for s in range(len(SHAPES)) if s != si and not is_unseen(ci, s)]
    if not choices:
        return None
    new = list(obj)
    new[k] = (ci, int(rng.choice(choices)))
    return [f"{list(COLORS)[c]} {SHAPES[s]}" for c, s in new]


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------
def render_scene(
    rng,
    size: int,
    allow_unseen: bool,
    unseen_boost: float = 0.0,
    radius_range=(0.12, 0.22),
    count_probs=(0.35, 0.30, 0.20, 0.15),
    two_stuff_prob: float = 0.4,
    num_captions: Tuple[int, int] = (1, 5),
    hard_negatives: bool = False,
):
    """Render one scene.

    Returns:
        dict with ``image`` (H, W, 3) uint8 RGB, ``sem`` (H, W) uint8 contiguous ids (255 = ignore),
        ``pan`` (H, W) int32 segment ids (0 = void), ``segments`` (list of dicts: id, category_id,
        isthing, area, bbox), ``captions`` (list of str) and ``hard_negatives`` (list of str, maybe
        empty).
    """
    image = np.empty((size, size, 3), np.uint8)
    sem = np.empty((size, size), np.uint8)
    pan = np.zeros((size, size), np.int32)
    stuff_idx = [int(rng.integers(len(STUFF)))]
    region = np.zeros((size, size), np.int8)
    if rng.random() < two_stuff_prob:
        other = int(rng.integers(len(STUFF) - 1))
        stuff_idx.append(other + (other >= stuff_idx[0]))
        xs = np.arange(size) / size
        boundary = size * (0.35 + 0.3 * rng.random()) + size * 0.06 * np.sin(
            xs * (4 + 6 * rng.random()) + rng.random() * 6.28
        )
        region = (np.arange(size)[:, None] > boundary[None, :]).astype(np.int8)
    for k, s in enumerate(stuff_idx):
        sel = region == k
        image[sel] = stuff_patch(STUFF[s], size, rng)[sel]
        sem[sel] = s
    num = int(rng.choice(len(count_probs), p=np.asarray(count_probs) / sum(count_probs))) + 1
    objects = []  # (colour index, shape index, mask)
    owner = np.full((size, size), -1, np.int32)
    for _ in range(num):
        ci, si = _sample_category(rng, allow_unseen, unseen_boost)
        r = size * rng.uniform(*radius_range)
        cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
        mask = shape_mask(SHAPES[si], size, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if not mask.any():
            continue
        rgb = np.clip(np.array(list(COLORS.values())[ci]) + rng.integers(-15, 16, 3), 0, 255)
        image[mask] = rgb.astype(np.uint8)
        owner[mask] = len(objects)
        objects.append((ci, si))
    min_visible = max(8, int(round(8 * (size / 64) ** 2)))
    segments, kept = [], []
    next_id = 1
    for k, s in enumerate(stuff_idx):
        sel = (region == k) & (owner < 0)
        if sel.any():
            pan[sel] = next_id
            segments.append(_segment(next_id, s + 1, False, sel))
            next_id += 1
    for k, (ci, si) in enumerate(objects):
        sel = owner == k
        n = int(sel.sum())
        if n == 0:
            continue
        if n <= min_visible:  # too small to name: ignore in every annotation and caption
            sem[sel] = 255
            continue
        cid = thing_id(ci, si)
        sem[sel] = cid - 1
        pan[sel] = next_id
        segments.append(_segment(next_id, cid, True, sel))
        next_id += 1
        kept.append((ci, si))
    names = [f"{list(COLORS)[c]} {SHAPES[s]}" for c, s in kept]
    stuff_names = [STUFF[s] for s in stuff_idx if (sem == s).any()] or [STUFF[stuff_idx[0]]]
    n_caps = int(rng.integers(num_captions[0], num_captions[1] + 1))
    if names:
        captions = [scene_caption(names, stuff_names, rng) for _ in range(n_caps)]
    else:
        captions = [f"a photo of the {stuff_names[0]}" for _ in range(n_caps)]
    negs = []
    if hard_negatives:
        neg = hard_negative_names(kept, rng)
        if neg is not None:
            negs = [scene_caption(neg, stuff_names, rng) for _ in range(n_caps)]
    return dict(
        image=image, sem=sem, pan=pan, segments=segments, captions=captions, hard_negatives=negs
    )


def render_object_centric(rng, size: int, radius_range=(0.25, 0.38), hard_negatives: bool = False):
    """One seen object on a plain grey background (toy analogue of a product photo).

    Returns the same dict as :func:`render_scene`; the background is void (0) in ``pan`` and ignore
    (255) in ``sem``.
    """
    grey = int(rng.integers(110, 160))
    image = np.full((size, size, 3), grey, np.uint8)
    image = np.clip(image + rng.normal(0, 3, (size, size, 1)), 0, 255).astype(np.uint8)
    ci, si = _sample_category(rng, allow_unseen=False, unseen_boost=0.0)
    r = size * rng.uniform(*radius_range)
    cx, cy = rng.uniform(r * 0.9, size - r * 0.9, 2)
    mask = shape_mask(SHAPES[si], size, cx, cy, r, rng.uniform(0, 2 * math.pi))
    rgb = np.clip(np.array(list(COLORS.values())[ci]) + rng.integers(-15, 16, 3), 0, 255)
    image[mask] = rgb.astype(np.uint8)
    sem = np.full((size, size), 255, np.uint8)
    pan = np.zeros((size, size), np.int32)
    cid = thing_id(ci, si)
    sem[mask] = cid - 1
    pan[mask] = 1
    name = f"{list(COLORS)[ci]} {SHAPES[si]}"
    phrase = f"{_article(name)} {name}"
    captions = [OBJECT_CENTRIC[rng.integers(len(OBJECT_CENTRIC))].format(L=phrase)]
    negs = []
    if hard_negatives:
        neg = hard_negative_names([(ci, si)], rng)
        if neg is not None:
            captions_neg = f"{_article(neg[0])} {neg[0]}"
            negs = [OBJECT_CENTRIC[rng.integers(len(OBJECT_CENTRIC))].format(L=captions_neg)]
    return dict(
        image=image,
        sem=sem,
        pan=pan,
        segments=[_segment(1, cid, True, mask)],
        captions=captions,
        hard_negatives=negs,
    )


def render_object_crop(
    rng,
    size: int,
    radius_range=(0.12, 0.22),
    expand_range=(1.0, 1.0),
    hard_negatives: bool = False,
    in_context: bool = False,
    square: bool = False,
):
    """One seen object of a scene, cut out exactly as the classifiers see it at test time.

    A scene (seen objects only) is rendered, one of its named objects is picked, and its masked crop
    is made with :func:`ov_seg.modeling.clip.masked_crops.prepare_masked_crops`, the function that
    builds the evaluation and proposal crops: the mask's box (× a ratio drawn from
    ``expand_range``; 1.0 = the tight box of OVSeg's crops) resized to ``size`` × ``size``, the CLIP
    pixel mean outside the mask. Captioned like an object-centric web photo ("a photo of a red
    star"). Falls back to the scene itself when no object survived occlusion.

    ``in_context``: the same box (clipped to the image) keeps the scene's pixels instead of the
    grey fill (the object among its stuff and neighbours, at the scale the ratio gives); ``sem`` /
    ``pan`` still mark only the named object.

    ``square``: the crop's box is a square of side max(w, h) × the ratio (the object keeps its
    aspect ratio), as the classifiers crop with ``MODEL.CLIP.MASK_SQUARE_CROP``.

    Returns:
        the dict of :func:`render_scene`; the background is void (0) in ``pan`` and ignore (255) in
        ``sem``.
    """
    import torch

    from ov_seg.modeling.clip.builder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
    from ov_seg.modeling.clip.masked_crops import prepare_masked_crops

    scene = render_scene(rng, size, allow_unseen=False, radius_range=radius_range)
    things = [s for s in scene["segments"] if s["category_id"] > len(STUFF)]
    if not things:
        return scene
    seg = things[int(rng.integers(len(things)))]
    image = torch.from_numpy(scene["image"]).permute(2, 0, 1)
    mask = torch.from_numpy(scene["pan"] == seg["id"])[None]
    ratio = float(rng.uniform(*expand_range))
    with torch.no_grad():
        crops = prepare_masked_crops(image, mask, expand_ratio=ratio, out_size=size, square=square)
    crop_mask = crops.masks[0].numpy()
    if in_context:
        x0, y0, x1, y1 = crops.boxes[0].tolist()
        h, w = scene["image"].shape[:2]
        # the crop's box clipped to the image; its mask resampled with the same box
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        window = scene["image"][y0:y1, x0:x1]
        crop = cv2.resize(window, (size, size), interpolation=cv2.INTER_LINEAR)
        crop_mask = (
            cv2.resize(
                (scene["pan"][y0:y1, x0:x1] == seg["id"]).astype(np.uint8),
                (size, size),
                interpolation=cv2.INTER_NEAREST,
            )
            > 0
        )
    else:
        mean = torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1)
        crop = (crops.images[0] * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0)
        crop = crop.numpy()
    cid = seg["category_id"]
    sem = np.full((size, size), 255, np.uint8)
    pan = np.zeros((size, size), np.int32)
    sem[crop_mask] = cid - 1
    pan[crop_mask] = 1
    k = cid - len(STUFF) - 1
    ci, si = divmod(k, len(SHAPES))
    name = f"{list(COLORS)[ci]} {SHAPES[si]}"
    captions = [
        OBJECT_CENTRIC[rng.integers(len(OBJECT_CENTRIC))].format(L=f"{_article(name)} {name}")
    ]
    negs = []
    if hard_negatives:
        neg = hard_negative_names([(ci, si)], rng)
        if neg is not None:
            phrase = f"{_article(neg[0])} {neg[0]}"
            negs = [OBJECT_CENTRIC[rng.integers(len(OBJECT_CENTRIC))].format(L=phrase)]
    return dict(
        image=np.ascontiguousarray(crop),
        sem=sem,
        pan=pan,
        segments=[_segment(1, cid, True, crop_mask)],
        captions=captions,
        hard_negatives=negs,
    )


def _sample_category(rng, allow_unseen: bool, unseen_boost: float) -> Tuple[int, int]:
    """(colour index, shape index); seen only unless ``allow_unseen``; ``unseen_boost`` = P(force
    unseen)."""
    while True:
        ci, si = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
        unseen = is_unseen(ci, si)
        if allow_unseen and unseen_boost > 0 and rng.random() < unseen_boost:
            si = int(rng.choice(unseen_shapes(ci)))
            return ci, si
        if not unseen or allow_unseen:
            return ci, si


def _segment(seg_id: int, category_id: int, isthing: bool, sel: np.ndarray) -> dict:
    ys, xs = np.nonzero(sel)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": seg_id,
        "category_id": int(category_id),
        "iscrowd": 0,
        "area": int(sel.sum()),
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
    }
