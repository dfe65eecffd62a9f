"""The embedded default dataset: a procedural, seeded toy world written in upstream formats."""

from .categories import CATEGORIES, CLASS_NAMES, SEEN_THING_IDS, UNSEEN_THING_IDS, is_unseen
from .generate import SplitSpec, ToyWorldSpec, default_splits, generate_toyworld, render_image

__all__ = [
    "CATEGORIES",
    "CLASS_NAMES",
    "SEEN_THING_IDS",
    "UNSEEN_THING_IDS",
    "is_unseen",
    "SplitSpec",
    "ToyWorldSpec",
    "default_splits",
    "generate_toyworld",
    "render_image",
]
