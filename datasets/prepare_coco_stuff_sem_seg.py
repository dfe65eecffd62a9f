#!/usr/bin/env python
"""Convert COCO-Stuff 164k label maps into the COCO-Stuff-171 layout ov_seg registers.

    python datasets/prepare_coco_stuff_sem_seg.py        # in $DETECTRON2_DATASETS/coco

Reads   <root>/stuffthingmaps/{train2017,val2017}/*.png   8-bit, COCO category id - 1, 255 unlabeled
        (unzipped ``stuffthingmaps_trainval2017.zip``); <root>/{train2017,val2017}/ must exist
Writes  <root>/stuffthingmaps_detectron2/{train2017,val2017}/*.png   8-bit, 0..170, ignore 255
        (unlabeled, "other" (183) and unused ids are ignored)

Files are written atomically; a rerun skips finished images (``--force`` redoes them).
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
    require_path,
    run_conversion,
    save_image_atomic,
)
from ov_seg.data.datasets.register_coco import COCO_DIR, COCO_STUFF_171_CATEGORIES

STUFF_HINT = (
    "Download stuffthingmaps_trainval2017.zip (https://github.com/nightrome/cocostuff#downloads) "
    "and unzip it into coco/stuffthingmaps (see datasets/README.md)."
)
IMAGES_HINT = "Download the COCO 2017 images from https://cocodataset.org/#download."
# stuffthingmaps value (COCO id - 1) -> contiguous id
STUFF_LUT = build_lut(
    {coco_id - 1: i for i, (coco_id, _) in enumerate(COCO_STUFF_171_CATEGORIES)}, 255, np.uint8
)


def convert_image(job) -> None:
    """Write the COCO-Stuff-171 label map of one upstream stuffthingmap."""
    raw = read_label_image(job["map"], bit_depth=8)
    save_image_atomic(apply_lut(raw, STUFF_LUT, 255), Path(job["outputs"][0]), "PNG")


def find_jobs(root: Path, split: str):
    """One job per PNG of ``stuffthingmaps/<split>``."""
    src = require_path(root / "stuffthingmaps" / split, "COCO-Stuff label folder", STUFF_HINT)
    require_path(root / split, "COCO image folder", IMAGES_HINT)
    maps = sorted(src.glob("*.png"))
    if not maps:
        raise FileNotFoundError(f"no *.png label map in {src}. {STUFF_HINT}")
    out = root / "stuffthingmaps_detectron2" / split
    return [{"map": str(m), "outputs": [str(out / m.name)]} for m in maps]


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
    require_path(args.root, "coco folder", IMAGES_HINT)
    summary = {}
    for split in args.splits:
        jobs = find_jobs(args.root, split)
        summary[split] = run_conversion(
            convert_image, jobs, f"COCO-Stuff {split}", workers=args.workers, force=args.force
        )
    print(json.dumps({"root": str(args.root), **summary}))
    return summary


if __name__ == "__main__":
    main()
