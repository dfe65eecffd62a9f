"""Register Pascal VOC 2012 semantic segmentation, 20 classes without background.

Names: ``pascalvoc20_sem_seg_train`` and ``pascalvoc20_sem_seg_val`` (detectron2's
``voc_2012_*`` are its detection datasets). Layout under ``$DETECTRON2_DATASETS``, written by
``datasets/prepare_voc_sem_seg.py``::

    VOCdevkit/VOC2012/JPEGImages/*.jpg
    VOCdevkit/VOC2012/annotations_detectron2/voc20_{train,val}/*.png   8-bit, 0..19, ignore 255

Background and the upstream void boundary (255) are both ignored. Seen/unseen: the zero-shot
protocol of SPNet / ZS3Net (15 seen, 5 unseen: potted plant, sheep, sofa, train, tv monitor).
"""

from pathlib import Path
from typing import Dict, Optional

from detectron2.data.datasets.pascal_voc import CLASS_NAMES

from .benchmark_utils import register_sem_seg, split_metadata
from .register_toyworld import datasets_root

__all__ = [
    "PASCAL_VOC_20_CLASSES",
    "PASCAL_VOC_20_UNSEEN",
    "PASCAL_VOC_DIR",
    "pascal_voc_20_metadata",
    "register_pascal_voc_20",
]

PASCAL_VOC_DIR = "VOCdevkit/VOC2012"
PASCAL_VOC_20_CLASSES = tuple(CLASS_NAMES)  # upstream ids 1..20 in this order
PASCAL_VOC_20_UNSEEN = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
PREPARE_CMD = "python datasets/prepare_voc_sem_seg.py"


def pascal_voc_20_metadata() -> Dict:
    """Metadata of VOC-20, with the SPNet / ZS3Net seen/unseen split."""
    return {
        "stuff_classes": list(PASCAL_VOC_20_CLASSES),
        "ignore_label": 255,
        "sem_seg_bit_depth": 8,
        "evaluator_type": "ov_sem_seg",
        **split_metadata(PASCAL_VOC_20_CLASSES, PASCAL_VOC_20_UNSEEN),
    }


def register_pascal_voc_20(root: Optional[Path] = None) -> None:
    """Register ``pascalvoc20_sem_seg_{train,val}`` under ``root`` (``$DETECTRON2_DATASETS``)."""
    base = Path(root if root is not None else datasets_root()) / PASCAL_VOC_DIR
    for split in ("train", "val"):
        register_sem_seg(
            f"pascalvoc20_sem_seg_{split}",
            image_dir=base / "JPEGImages",
            gt_dir=base / "annotations_detectron2" / f"voc20_{split}",
            gt_ext="png",
            image_ext="jpg",
            prepare_cmd=PREPARE_CMD,
            metadata=pascal_voc_20_metadata(),
        )


register_pascal_voc_20()
