#!/usr/bin/env python
"""Convert ADE20K SceneParsing (ADEChallengeData2016) labels for detectron2's builtin ADE20K-150.

    python datasets/prepare_ade20k_sem_seg.py      # in $DETECTRON2_DATASETS/ADEChallengeData2016

Reads   <root>/annotations/{training,validation}/*.png   8-bit, 0 = other, 1..150 classes
        <root>/images/{training,validation}/              checked to exist
Writes  <root>/annotations_detectron2/{training,validation}/*.png   8-bit, 0..149, ignore 255

The result is what detectron2's ``ade20k_sem_seg_{train,val}`` (registered by detectron2 itself)
read. ``ADEChallengeData2016.zip`` comes from http://sceneparsing.csail.mit.edu/. Files are written
atomically; a rerun skips finished images (``--force`` redoes them).
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

DOWNLOAD_HINT = (
    "Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it into "
    "$DETECTRON2_DATASETS (see datasets/README.md)."
)
# upstream 1..150 -> 0..149; 0 ("other") -> ignore
ADE150_LUT = build_lut({k: k - 1 for k in range(1, 151)}, 255, np.uint8)


def convert_image(job) -> None:
    """Write the 150-class label map of one upstream annotation."""
    raw = read_label_image(job["annotation"], bit_depth=8)
    if raw.max(initial=0) > 150:
        raise ValueError(f"{job['annotation']}: values above 150 (not an ADE20K-150 annotation)")
    save_image_atomic(apply_lut(raw, ADE150_LUT, 255), Path(job["outputs"][0]), "PNG")


def find_jobs(root: Path, folder: str):
    """One job per PNG of ``annotations/<folder>``."""
    src = require_path(root / "annotations" / folder, "ADE20K annotation folder", DOWNLOAD_HINT)
    require_path(root / "images" / folder, "ADE20K image folder", DOWNLOAD_HINT)
    annotations = sorted(src.glob("*.png"))
    if not annotations:
        raise FileNotFoundError(f"no *.png annotation in {src}. {DOWNLOAD_HINT}")
    out = root / "annotations_detectron2" / folder
    return [{"annotation": str(a), "outputs": [str(out / a.name)]} for a in annotations]


def main(argv=None):
    default_root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / "ADEChallengeData2016"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--root", type=Path, default=default_root, help="the ADEChallengeData2016 folder"
    )
    p.add_argument(
        "--splits",
        nargs="+",
        default=["training", "validation"],
        choices=["training", "validation"],
    )
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--force", action="store_true", help="redo images already converted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_path(args.root, "ADEChallengeData2016 folder", DOWNLOAD_HINT)
    summary = {}
    for folder in args.splits:
        jobs = find_jobs(args.root, folder)
        summary[folder] = run_conversion(
            convert_image, jobs, f"ADE20K-150 {folder}", workers=args.workers, force=args.force
        )
    print(json.dumps({"root": str(args.root), **summary}))
    return summary


if __name__ == "__main__":
    main()
