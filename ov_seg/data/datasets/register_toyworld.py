"""Register the toy world (semantic, panoptic, captions; splits train / val / web).

Names: ``{variant}_sem_seg_{split}``, ``{variant}_panoptic_{split}``, ``{variant}_captions_{split}``
for the variants in ``TOYWORLD_VARIANTS`` (root ``$DETECTRON2_DATASETS/{variant}``). Registration
reads no file; loading a split that was not generated raises ``FileNotFoundError`` naming the
command that writes it.
"""

import json
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from ov_seg.data.toyworld.categories import CATEGORIES, CLASS_NAMES, COLORS, SHAPES
from ov_seg.data.toyworld.render import CAPTION_TEMPLATES

__all__ = ["register_toyworld", "TOYWORLD_VARIANTS", "toyworld_metadata", "datasets_root"]

# variant name -> image size the prepare command uses for it
TOYWORLD_VARIANTS = {"toyworld": 64, "toyworld_large": 128}
SPLITS = ("train", "val", "web")


def datasets_root() -> Path:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), as detectron2's builtin datasets use it."""
    return Path(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _check_split(root: Path, variant: str, split: str) -> None:
    if not (root / split / "DONE.json").is_file():
        size = TOYWORLD_VARIANTS.get(variant, 64)
        raise FileNotFoundError(
            f"toy world split {split!r} not found under {root} (no {root / split / 'DONE.json'}). "
            f"Generate it with: python datasets/prepare_toyworld.py --name {variant} "
            f"--image-size {size}"
            " (writes under $DETECTRON2_DATASETS)"
        )


def toyworld_metadata() -> dict:
    """Metadata shared by every toy-world dataset (contiguous id = dataset id - 1)."""
    return {
        "stuff_classes": list(CLASS_NAMES),
        "stuff_colors": [list(c.color) for c in CATEGORIES],
        "seen_classes": [c.name for c in CATEGORIES if c.seen],
        "unseen_classes": [c.name for c in CATEGORIES if not c.seen],
        "seen_class_ids": [c.id - 1 for c in CATEGORIES if c.seen],
        "unseen_class_ids": [c.id - 1 for c in CATEGORIES if not c.seen],
        # amorphous classes (every one seen): left out of the seen-class calibration
        # (MODEL.SEEN_CALIBRATION.EXEMPT_STUFF)
        "stuff_names": [c.name for c in CATEGORIES if not c.isthing],
        "ignore_label": 255,
        # per contiguous id, the index of each attribute a name is made of (-1: none, stuff): the
        # mask-classification evaluator's attribute probe (colour accuracy, shape within colour)
        "class_attributes": {
            "colour": [list(COLORS).index(c.colour_name) if c.isthing else -1 for c in CATEGORIES],
            "shape": [SHAPES.index(c.shape) if c.isthing else -1 for c in CATEGORIES],
        },
    }


def toyworld_panoptic_metadata() -> dict:
    """Extra panoptic metadata (MaskFormer convention: one contiguous space over things and
    stuff)."""
    things = [c for c in CATEGORIES if c.isthing]
    stuff = [c for c in CATEGORIES if not c.isthing]
    return {
        "thing_classes": list(CLASS_NAMES),
        "thing_colors": [list(c.color) for c in CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c.id: c.id - 1 for c in things},
        "stuff_dataset_id_to_contiguous_id": {c.id: c.id - 1 for c in stuff},
        "label_divisor": 1000,
    }


def _split_dirs(root: Path, split: str, *names: str) -> list:
    """``str(root / split / name)`` for each name (file names are then joined as strings: building
    a ``Path`` per record cost 2 s for the 20k web images)."""
    return [str(root / split / n) for n in names]


def load_toyworld_sem_seg(root: Path, variant: str, split: str):
    """Dataset dicts: file_name, sem_seg_file_name, height, width, image_id."""
    _check_split(root, variant, split)
    with open(root / f"captions_{split}.json") as f:
        records = json.load(f)["images"]
    images, sem_seg = _split_dirs(root, split, "images", "sem_seg")
    return [
        {
            "file_name": os.path.join(images, im["file_name"]),
            "sem_seg_file_name": os.path.join(sem_seg, im["file_name"]),
            "height": im["height"],
            "width": im["width"],
            "image_id": im["id"],
        }
        for im in records
    ]


def load_toyworld_panoptic(root: Path, variant: str, split: str):
    """Dataset dicts in detectron2's panoptic format (+ ``sem_seg_file_name``)."""
    _check_split(root, variant, split)
    with open(root / f"panoptic_{split}.json") as f:
        pan = json.load(f)
    isthing = {c.id: c.isthing for c in CATEGORIES}
    sizes = {im["id"]: im for im in pan["images"]}
    images, panoptic, sem_seg = _split_dirs(root, split, "images", "panoptic", "sem_seg")
    out = []
    for ann in pan["annotations"]:
        im = sizes[ann["image_id"]]
        segs = [
            {**s, "category_id": s["category_id"] - 1, "isthing": isthing[s["category_id"]]}
            for s in ann["segments_info"]
        ]
        out.append(
            {
                "file_name": os.path.join(images, im["file_name"]),
                "pan_seg_file_name": os.path.join(panoptic, ann["file_name"]),
                "sem_seg_file_name": os.path.join(sem_seg, ann["file_name"]),
                "segments_info": segs,
                "height": im["height"],
                "width": im["width"],
                "image_id": ann["image_id"],
            }
        )
    return out


def load_toyworld_captions(root: Path, variant: str, split: str):
    """Caption dataset dicts: file_name, image_id, height, width, captions (list), hard_negatives
    (list)."""
    _check_split(root, variant, split)
    with open(root / f"captions_{split}.json") as f:
        data = json.load(f)
    by_image = {im["id"]: {"captions": [], "hard_negatives": []} for im in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]]["captions"].append(ann["caption"])
        if "hard_negative" in ann:
            by_image[ann["image_id"]]["hard_negatives"].append(ann["hard_negative"])
    images, sem_seg = _split_dirs(root, split, "images", "sem_seg")
    return [
        {
            "file_name": os.path.join(images, im["file_name"]),
            "sem_seg_file_name": os.path.join(sem_seg, im["file_name"]),
            "image_id": im["id"],
            "height": im["height"],
            "width": im["width"],
            **by_image[im["id"]],
        }
        for im in data["images"]
    ]


_LOADERS = {
    "sem_seg": (load_toyworld_sem_seg, "ov_sem_seg"),
    "panoptic": (load_toyworld_panoptic, "coco_panoptic_seg"),
    "captions": (load_toyworld_captions, "caption"),
}


class _CachedLoader:
    """``loader(root, variant, split)``, parsed once per process while the split's files are
    unchanged (a training run reads a caption split twice: for the text vocabulary and the data
    loader; 1.5 s each for the 20k web images). Each call returns fresh copies of the records."""

    def __init__(self, loader, root: Path, variant: str, split: str):
        self.loader, self.args = loader, (root, variant, split)
        self._key, self._records = None, None

    def __call__(self):
        root, _, split = self.args
        stamp = root / split / "DONE.json"
        key = (stamp.stat().st_mtime_ns, stamp.stat().st_size) if stamp.is_file() else None
        if key is None or key != self._key:
            self._records, self._key = self.loader(*self.args), key
        return [dict(r) for r in self._records]


def register_toyworld(variant: str = "toyworld", root=None) -> None:
    """Register every (kind, split) dataset of a toy-world variant rooted at ``root``."""
    root = Path(root) if root is not None else datasets_root() / variant
    meta = toyworld_metadata()
    for kind, (loader, evaluator_type) in _LOADERS.items():
        for split in SPLITS:
            name = f"{variant}_{kind}_{split}"
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(name, _CachedLoader(loader, root, variant, split))
            extra = {}
            if kind == "panoptic":
                extra = {
                    **toyworld_panoptic_metadata(),
                    "panoptic_root": str(root / split / "panoptic"),
                    "panoptic_json": str(root / f"panoptic_{split}.json"),
                }
            if kind in ("sem_seg", "captions"):
                extra["sem_seg_root"] = str(root / split / "sem_seg")
            if kind == "captions":
                # what the captions are written with: captions that say the same thing are no
                # negatives of each other in contrastive training
                # (MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES)
                extra["caption_templates"] = list(CAPTION_TEMPLATES)
            MetadataCatalog.get(name).set(
                evaluator_type=evaluator_type,
                image_root=str(root / split / "images"),
                dataset_root=str(root),
                **meta,
                **extra,
            )


for _variant in TOYWORLD_VARIANTS:
    register_toyworld(_variant)
