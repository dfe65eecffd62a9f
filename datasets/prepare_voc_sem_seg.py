#!/usr/bin/env python
"""Convert Pascal VOC 2012 segmentation into the VOC-20 (no background) layout ov_seg registers.

    python datasets/prepare_voc_sem_seg.py               # in $DETECTRON2_DATASETS/VOCdevkit/VOC2012

Reads   <root>/ImageSets/Segmentation/{train,val}.txt   (1464 / 1449 images)
        <root>/SegmentationClass/<id>.png   palette PNG: 0 = background, 1..20 classes, 255 = void
        <root>/JPEGImages/<id>.jpg          checked to exist
Writes  <root>/annotations_detectron2/voc20_{train,val}/<id>.png   8-bit, 0..19, ignore 255
        (background and void both ignored)

``--mask-dir SegmentationClassAug`` reads SBD-augmented masks (same encoding) instead. Files are
written atomically; a rerun skips finished images (``--force`` redoes them).
"""

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from ov_seg.data.datasets.benchmark_utils import (
    apply_lut,
    build_lut,
    read_label_image,
    read_split_file,
    require_path,
    run_conversion,
    save_image_atomic,
)
from ov_seg.data.datasets.register_pascal_voc import PASCAL_VOC_20_CLASSES, PASCAL_VOC_DIR

VOC_HINT = (
    "Extract VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) into "
    "$DETECTRON2_DATASETS (see datasets/README.md)."
)
# upstream id -> VOC-20 id: 1..20 -> 0..19, background 0 and void 255 -> ignore
VOC20_LUT = build_lut({k: k - 1 for k in range(1, len(PASCAL_VOC_20_CLASSES) + 1)}, 255, np.uint8)


def convert_image(job) -> None:
    """Write the VOC-20 label map of one upstream mask."""
    mask = read_label_image(job["mask"], bit_depth=8)
    unknown = np.setdiff1d(np.unique(mask), [*range(len(PASCAL_VOC_20_CLASSES) + 1), 255])
    if unknown.size:
        raise ValueError(f"{job['mask']}: values {unknown.tolist()} are not VOC class ids")
    save_image_atomic(apply_lut(mask, VOC20_LUT, 255), Path(job["outputs"][0]), "PNG")


def find_jobs(root: Path, split: str, mask_dir: str):
    """One job per image id of ``ImageSets/Segmentation/<split>.txt``."""
    ids = read_split_file(root / "ImageSets" / "Segmentation" / f"{split}.txt", VOC_HINT)
    jobs = []
    for image_id in ids:
        mask = require_path(root / mask_dir / f"{image_id}.png", "VOC mask", VOC_HINT)
        require_path(root / "JPEGImages" / f"{image_id}.jpg", "image", VOC_HINT)
        out = root / "annotations_detectron2" / f"voc20_{split}" / f"{image_id}.png"
        jobs.append({"mask": str(mask), "outputs": [str(out)]})
    return jobs


def main(argv=None):
    default_root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / PASCAL_VOC_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=default_root, help="the VOC2012 folder")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--mask-dir", default="SegmentationClass", help="folder of upstream masks")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--force", action="store_true", help="redo images already converted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_path(args.root, "VOC2012 folder", VOC_HINT)
    summary = {}
    for split in args.splits:
        jobs = find_jobs(args.root, split, args.mask_dir)
        summary[split] = run_conversion(
            convert_image, jobs, f"VOC-20 {split}", workers=args.workers, force=args.force
        )
    print(json.dumps({"root": str(args.root), **summary}))
    return summary


if __name__ == "__main__":
    main()
