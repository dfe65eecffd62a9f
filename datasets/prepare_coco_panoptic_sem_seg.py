#!/usr/bin/env python
"""Derive 133-class semantic label maps from COCO panoptic annotations.

    python datasets/prepare_coco_panoptic_sem_seg.py     # in $DETECTRON2_DATASETS/coco

Reads   <root>/annotations/panoptic_{train2017,val2017}.json
        <root>/panoptic_{train2017,val2017}/*.png   RGB, segment id = R + 256 G + 256^2 B
        (both from ``panoptic_annotations_trainval2017.zip``; the PNG folders are zipped inside it)
Writes  <root>/panoptic_semseg_{train2017,val2017}/*.png   8-bit, 0..132 (detectron2's contiguous
        panoptic ids over things and stuff), ignore 255 (void and unlisted segments)

These complete ``coco_2017_*_panoptic_with_sem_seg``. Files are written atomically; a rerun skips
finished images (``--force`` redoes them).
"""

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image

from ov_seg.data.datasets.benchmark_utils import require_path, run_conversion, save_image_atomic
from ov_seg.data.datasets.register_coco import COCO_DIR

PANOPTIC_HINT = (
    "Download panoptic_annotations_trainval2017.zip from https://cocodataset.org/#download, unzip "
    "it into coco/, then unzip annotations/panoptic_{train,val}2017.zip into coco/ "
    "(see datasets/README.md)."
)


def category_to_contiguous():
    """COCO panoptic category id → contiguous id, from detectron2's builtin panoptic metadata."""
    meta = MetadataCatalog.get("coco_2017_train_panoptic")
    return {**meta.thing_dataset_id_to_contiguous_id, **meta.stuff_dataset_id_to_contiguous_id}


def convert_image(job) -> None:
    """Write the semantic label map of one panoptic PNG."""
    with Image.open(job["png"]) as im:
        if im.mode != "RGB":
            raise ValueError(
                f"{job['png']}: expected an RGB panoptic PNG, got PIL mode {im.mode!r}"
            )
        rgb = np.asarray(im).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    out = np.full(ids.shape, 255, dtype=np.uint8)
    for segment_id, contiguous in job["segments"]:
        out[ids == segment_id] = contiguous
    save_image_atomic(out, Path(job["outputs"][0]), "PNG")


def find_jobs(root: Path, split: str):
    """One job per annotation of ``annotations/panoptic_<split>.json``."""
    json_file = require_path(
        root / "annotations" / f"panoptic_{split}.json", "COCO panoptic json", PANOPTIC_HINT
    )
    png_dir = require_path(root / f"panoptic_{split}", "COCO panoptic PNG folder", PANOPTIC_HINT)
    with open(json_file) as f:
        annotations = json.load(f)["annotations"]
    to_contiguous = category_to_contiguous()
    jobs = []
    for ann in annotations:
        png = require_path(png_dir / ann["file_name"], "panoptic PNG", PANOPTIC_HINT)
        segments = []
        for s in ann["segments_info"]:
            if s["category_id"] not in to_contiguous:
                raise ValueError(f"{json_file}: unknown category id {s['category_id']}")
            segments.append((s["id"], to_contiguous[s["category_id"]]))
        out = root / f"panoptic_semseg_{split}" / ann["file_name"]
        jobs.append({"png": str(png), "segments": segments, "outputs": [str(out)]})
    return jobs


def main(argv=None):
    default_root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / COCO_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=default_root, help="the coco folder")
    p.add_argument(
        "--splits", nargs="+", default=["train2017", "val2017"], choices=["train2017", "val2017"]
    )
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--force", action="store_true", help="redo images already converted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_path(args.root, "coco folder", PANOPTIC_HINT)
    summary = {}
    for split in args.splits:
        jobs = find_jobs(args.root, split)
        summary[split] = run_conversion(
            convert_image, jobs, f"COCO panoptic {split}", workers=args.workers, force=args.force
        )
    print(json.dumps({"root": str(args.root), **summary}))
    return summary


if __name__ == "__main__":
    main()
