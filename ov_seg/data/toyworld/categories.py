"""The toy world's fixed vocabulary: 5 stuff textures and 8 colours x 8 shapes of objects.

The open-vocabulary split keeps every colour and every shape in training but holds out 2 shapes per
colour: shape index (3c + {0, 4}) mod 8 is unseen for colour c (16 unseen, 48 seen thing categories;
each shape is unseen for exactly 2 colours).
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

STUFF = ("grass", "sky", "water", "sand", "wall")
COLORS: Dict[str, Tuple[int, int, int]] = {  # RGB
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 50, 180),
    "orange": (250, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "hexagon")
# Display colours of stuff categories (for visualisation only).
STUFF_DISPLAY = {
    "grass": (90, 150, 60),
    "sky": (130, 180, 235),
    "water": (40, 110, 160),
    "sand": (215, 195, 140),
    "wall": (160, 90, 70),
}


@dataclass(frozen=True)
class Category:
    """One toy-world category. ``id`` is the 1-based dataset id; contiguous id = ``id - 1``."""

    id: int
    name: str
    isthing: bool
    seen: bool
    color: Tuple[int, int, int]
    colour_name: str = ""
    shape: str = ""


def unseen_shapes(colour_index: int) -> Tuple[int, int]:
    """The two shape indices held out for a colour: (3c + {0, 4}) mod 8 (the one definition of
    the open-vocabulary split)."""
    n = len(SHAPES)
    return ((3 * colour_index) % n, (3 * colour_index + n // 2) % n)


def is_unseen(colour_index: int, shape_index: int) -> bool:
    """Whether the (colour, shape) combination is held out of every training split."""
    return shape_index in unseen_shapes(colour_index)


def _build() -> List[Category]:
    cats = [Category(i + 1, s, False, True, STUFF_DISPLAY[s]) for i, s in enumerate(STUFF)]
    for ci, (cname, rgb) in enumerate(COLORS.items()):
        for si, shape in enumerate(SHAPES):
            cats.append(
                Category(
                    id=len(cats) + 1,
                    name=f"{cname} {shape}",
                    isthing=True,
                    seen=not is_unseen(ci, si),
                    color=rgb,
                    colour_name=cname,
                    shape=shape,
                )
            )
    return cats


CATEGORIES: List[Category] = _build()
CLASS_NAMES: List[str] = [c.name for c in CATEGORIES]
THING_IDS: List[int] = [c.id for c in CATEGORIES if c.isthing]
SEEN_THING_IDS: List[int] = [c.id for c in CATEGORIES if c.isthing and c.seen]
UNSEEN_THING_IDS: List[int] = [c.id for c in CATEGORIES if c.isthing and not c.seen]
NAME_TO_ID: Dict[str, int] = {c.name: c.id for c in CATEGORIES}


def thing_id(colour_index: int, shape_index: int) -> int:
    """Dataset id of the thing category (colour, shape)."""
    return len(STUFF) + colour_index * len(SHAPES) + shape_index + 1
