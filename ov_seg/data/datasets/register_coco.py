"""Register COCO-Stuff-171, COCO panoptic with semantic labels, and COCO captions 2017.

Names and layout under ``$DETECTRON2_DATASETS/coco``:

- ``coco_2017_{train,val}_stuff_sem_seg`` (COCO-Stuff-171, the proposal generator's training set):
  ``{train,val}2017/*.jpg`` + ``stuffthingmaps_detectron2/{train,val}2017/*.png`` (8-bit, 0..170,
  ignore 255), written by ``datasets/prepare_coco_stuff_sem_seg.py``. Seen/unseen: the SPNet 156/15
  zero-shot split.
- ``coco_2017_{train,val}_panoptic_with_sem_seg``: detectron2's builtin ``coco_2017_*_panoptic``
  (133 classes, contiguous over things and stuff) plus ``sem_seg_file_name`` in
  ``panoptic_semseg_{train,val}2017/*.png`` (8-bit, 0..132, ignore 255), written by
  ``datasets/prepare_coco_panoptic_sem_seg.py``. The builtin panoptic datasets are reused as is.
- ``coco_2017_captions_{train,val}``: ``annotations/captions_{train,val}2017.json`` as caption
  dataset dicts (``file_name``, ``image_id``, ``height``, ``width``, ``captions``: list of str), the
  layout of ``toyworld_captions_*``. No preparation.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from .benchmark_utils import register_sem_seg, require_path, split_metadata
from .register_toyworld import datasets_root

__all__ = [
    "COCO_STUFF_171_CATEGORIES",
    "COCO_STUFF_171_CLASSES",
    "COCO_STUFF_171_UNSEEN",
    "coco_stuff_metadata",
    "load_coco_captions",
    "load_coco_panoptic_with_sem_seg",
    "register_coco",
]

COCO_DIR = "coco"
COCO_DOWNLOAD = "Download it from https://cocodataset.org/#download (see datasets/README.md)."
PREPARE_STUFF_CMD = "python datasets/prepare_coco_stuff_sem_seg.py"
PREPARE_PANOPTIC_CMD = "python datasets/prepare_coco_panoptic_sem_seg.py"

# COCO-Stuff stuff classes, ids 92..182 (183 "other" is not a class of COCO-Stuff-171)
_COCO_STUFF_NAMES = (
    "banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet, "
    "ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, "
    "dirt, door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile, floor-wood, "
    "flower, fog, food-other, fruit, furniture-other, grass, gravel, ground-other, hill, house, "
    "leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin, net, paper, pavement, "
    "pillow, plant-other, plastic, platform, playingfield, railing, railroad, river, road, rock, "
    "roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, solid-other, stairs, stone, "
    "straw, structural-other, table, tent, textile-other, towel, tree, vegetable, wall-brick, "
    "wall-concrete, wall-other, wall-panel, wall-stone, wall-tile, wall-wood, water-other, "
    "waterdrops, window-blind, window-other, wood"
).split(", ")

# (COCO category id, name): the 80 things (detectron2's names) then the 91 stuff classes; the
# upstream stuffthingmaps store id - 1
COCO_STUFF_171_CATEGORIES = tuple(
    [(c["id"], c["name"]) for c in COCO_CATEGORIES if c["isthing"]]
    + [(92 + i, name) for i, name in enumerate(_COCO_STUFF_NAMES)]
)
COCO_STUFF_171_CLASSES = tuple(name for _, name in COCO_STUFF_171_CATEGORIES)
# SPNet (Xian et al. 2019) unseen classes, used by ZS3Net / ZegFormer / zsseg
COCO_STUFF_171_UNSEEN = (
    "frisbee",
    "skateboard",
    "cardboard",
    "carrot",
    "scissors",
    "suitcase",
    "giraffe",
    "cow",
    "road",
    "wall-concrete",
    "tree",
    "grass",
    "river",
    "clouds",
    "playingfield",
)


def coco_stuff_metadata() -> Dict:
    """Metadata of COCO-Stuff-171 (contiguous ids, COCO ids, SPNet seen/unseen split)."""
    return {
        "stuff_classes": list(COCO_STUFF_171_CLASSES),
        "stuff_dataset_id_to_contiguous_id": {
            coco_id: i for i, (coco_id, _) in enumerate(COCO_STUFF_171_CATEGORIES)
        },
        "ignore_label": 255,
        "sem_seg_bit_depth": 8,
        "evaluator_type": "ov_sem_seg",
        **split_metadata(COCO_STUFF_171_CLASSES, COCO_STUFF_171_UNSEEN),
    }


def load_coco_panoptic_with_sem_seg(
    panoptic_json: Path, image_dir: Path, panoptic_dir: Path, sem_seg_dir: Path, meta: Dict
) -> List[Dict]:
    """detectron2's COCO panoptic dicts plus ``sem_seg_file_name`` (133-class semantic PNG)."""
    hint = f"{COCO_DOWNLOAD} The panoptic PNGs come zipped inside the annotation archive."
    require_path(panoptic_json, "COCO panoptic annotation", hint)
    require_path(panoptic_dir, "COCO panoptic PNG folder", hint)
    require_path(
        sem_seg_dir, "semantic labels from panoptic", f"Create them with: {PREPARE_PANOPTIC_CMD}"
    )
    dicts = load_coco_panoptic_json(str(panoptic_json), str(image_dir), str(panoptic_dir), meta)
    for d in dicts:
        d["sem_seg_file_name"] = str(sem_seg_dir / Path(d["pan_seg_file_name"]).name)
    return dicts


def load_coco_captions(json_file: Path, image_dir: Path) -> List[Dict]:
    """Caption dataset dicts from a COCO captions json, images in ``json['images']`` order."""
    require_path(json_file, "COCO captions annotation", COCO_DOWNLOAD)
    with open(json_file) as f:
        data = json.load(f)
    captions = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"].strip())
    return [
        {
            "file_name": str(Path(image_dir) / im["file_name"]),
            "image_id": im["id"],
            "height": im["height"],
            "width": im["width"],
            "captions": captions[im["id"]],
        }
        for im in data["images"]
    ]


def _register(name: str, loader, metadata: Dict) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _builtin_panoptic_metadata() -> Dict:
    """Class metadata of detectron2's builtin standard COCO panoptic datasets."""
    meta = MetadataCatalog.get("coco_2017_train_panoptic")
    keys = (
        "thing_classes",
        "thing_colors",
        "stuff_classes",
        "stuff_colors",
        "thing_dataset_id_to_contiguous_id",
        "stuff_dataset_id_to_contiguous_id",
    )
    return {k: getattr(meta, k) for k in keys}


def register_coco(root: Optional[Path] = None) -> None:
    """Register the COCO-Stuff-171, panoptic-with-sem-seg and captions datasets under ``root``."""
    base = Path(root if root is not None else datasets_root()) / COCO_DIR
    panoptic_meta = _builtin_panoptic_metadata()
    for split in ("train", "val"):
        image_dir = base / f"{split}2017"
        register_sem_seg(
            f"coco_2017_{split}_stuff_sem_seg",
            image_dir=image_dir,
            gt_dir=base / "stuffthingmaps_detectron2" / f"{split}2017",
            gt_ext="png",
            image_ext="jpg",
            prepare_cmd=PREPARE_STUFF_CMD,
            metadata=coco_stuff_metadata(),
        )
        panoptic_json = base / "annotations" / f"panoptic_{split}2017.json"
        panoptic_dir = base / f"panoptic_{split}2017"
        sem_seg_dir = base / f"panoptic_semseg_{split}2017"
        _register(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            lambda j=panoptic_json, i=image_dir, p=panoptic_dir, s=sem_seg_dir: (
                load_coco_panoptic_with_sem_seg(j, i, p, s, panoptic_meta)
            ),
            {
                **panoptic_meta,
                "panoptic_root": str(panoptic_dir),
                "panoptic_json": str(panoptic_json),
                "image_root": str(image_dir),
                "sem_seg_root": str(sem_seg_dir),
                "evaluator_type": "coco_panoptic_seg",
                "ignore_label": 255,
                "label_divisor": 1000,
                "prepare_cmd": PREPARE_PANOPTIC_CMD,
            },
        )
        captions_json = base / "annotations" / f"captions_{split}2017.json"
        _register(
            f"coco_2017_captions_{split}",
            lambda j=captions_json, i=image_dir: load_coco_captions(j, i),
            {
                "image_root": str(image_dir),
                "json_file": str(captions_json),
                "evaluator_type": "caption",
            },
        )


register_coco()
