#!/usr/bin/env python
"""Convert Pascal Context (full, 459 classes) into the PC-459 and PC-59 layouts ov_seg registers.

    python datasets/prepare_pascal_context.py            # in $DETECTRON2_DATASETS/VOCdevkit/VOC2010

Reads   <root>/trainval/<id>.mat            ``LabelMap``: 0 = unlabeled, k = line "k: name" of
        <root>/labels.txt                   the 459 full classes
        <root>/ImageSets/Main/{train,val}.txt   VOC2010 splits (4998 / 5105 images)
        <root>/JPEGImages/<id>.jpg          checked to exist
Writes  <root>/annotations_detectron2/pc459_{train,val}/<id>.tif   16-bit, k - 1, ignore 65535
        <root>/annotations_detectron2/pc59_{train,val}/<id>.png    8-bit, 0..58, ignore 255

``trainval.tar.gz`` and ``labels.txt`` come from https://cs.stanford.edu/~roozbeh/pascal-context/,
the VOC2010 images and splits from ``VOCtrainval_03-May-2010.tar``. Files are written atomically;
a rerun skips finished images (``--force`` redoes them).
"""

import argparse
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import scipy.io

from ov_seg.data.datasets.benchmark_utils import (
    apply_lut,
    build_lut,
    read_split_file,
    require_path,
    run_conversion,
    save_image_atomic,
)
from ov_seg.data.datasets.register_pascal_context import (
    PASCAL_CONTEXT_59_CLASSES,
    PASCAL_CONTEXT_459_CLASSES,
    PASCAL_CONTEXT_DIR,
)

CONTEXT_HINT = (
    "Get trainval.tar.gz and labels.txt from https://cs.stanford.edu/~roozbeh/pascal-context/ and "
    "put them in VOCdevkit/VOC2010 (see datasets/README.md)."
)
VOC_HINT = (
    "Extract VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/) into "
    "$DETECTRON2_DATASETS (see datasets/README.md)."
)
_LABEL_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")


def read_labels(path: Path):
    """``{full id: name}`` of Pascal Context's ``labels.txt``, checked against the 459 classes."""
    labels = {}
    for line in (
        require_path(path, "Pascal Context labels.txt", CONTEXT_HINT).read_text().splitlines()
    ):
        m = _LABEL_LINE.match(line)
        if m and int(m.group(1)) > 0:
            labels[int(m.group(1))] = m.group(2)
    expected = {i + 1: name for i, name in enumerate(PASCAL_CONTEXT_459_CLASSES)}
    if labels != expected:
        diff = [(k, labels.get(k), v) for k, v in expected.items() if labels.get(k) != v]
        raise ValueError(
            f"{path} does not list the 459 Pascal Context classes in order "
            f"(first differences (id, file, expected): {diff[:5]}, {len(labels)} entries)"
        )
    return labels


def build_luts():
    """Look-up tables full id (0 = unlabeled) → PC-459 (uint16) and → PC-59 (uint8) ids."""
    full_ids = {name: i + 1 for i, name in enumerate(PASCAL_CONTEXT_459_CLASSES)}
    lut459 = build_lut({k: k - 1 for k in full_ids.values()}, 65535, dtype=np.uint16)
    lut59 = build_lut(
        {full_ids[name]: i for i, name in enumerate(PASCAL_CONTEXT_59_CLASSES)}, 255, dtype=np.uint8
    )
    return lut459, lut59


LUT_459, LUT_59 = build_luts()


def read_label_map(mat_path: Path) -> np.ndarray:
    """The ``LabelMap`` (H, W) of an upstream ``.mat``, with its values checked."""
    try:
        label_map = scipy.io.loadmat(mat_path)["LabelMap"]
    except KeyError:
        raise ValueError(f"{mat_path}: no 'LabelMap' variable (not a Pascal Context annotation)")
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"{mat_path}: LabelMap must be a 2-D integer array, got {label_map.dtype}")
    if label_map.min() < 0 or label_map.max() > len(PASCAL_CONTEXT_459_CLASSES):
        raise ValueError(f"{mat_path}: LabelMap values outside 0..459")
    return label_map.astype(np.int64)


def convert_image(job) -> None:
    """Write the PC-459 TIFF and the PC-59 PNG of one annotation."""
    label_map = read_label_map(job["mat"])
    save_image_atomic(apply_lut(label_map, LUT_459, 65535), Path(job["outputs"][0]), "TIFF")
    save_image_atomic(apply_lut(label_map, LUT_59, 255), Path(job["outputs"][1]), "PNG")


def find_jobs(root: Path, split: str):
    """One job per image id of the VOC2010 ``ImageSets/Main/<split>.txt``."""
    ids = read_split_file(root / "ImageSets" / "Main" / f"{split}.txt", VOC_HINT)
    out = root / "annotations_detectron2"
    jobs = []
    for image_id in ids:
        mat = require_path(root / "trainval" / f"{image_id}.mat", "annotation", CONTEXT_HINT)
        require_path(root / "JPEGImages" / f"{image_id}.jpg", "image", VOC_HINT)
        jobs.append(
            {
                "mat": str(mat),
                "outputs": [
                    str(out / f"pc459_{split}" / f"{image_id}.tif"),
                    str(out / f"pc59_{split}" / f"{image_id}.png"),
                ],
            }
        )
    return jobs


def main(argv=None):
    default_root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / PASCAL_CONTEXT_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=default_root, help="the VOC2010 folder")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--force", action="store_true", help="redo images already converted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_path(args.root, "VOC2010 folder", VOC_HINT)
    require_path(args.root / "trainval", "Pascal Context trainval/ folder", CONTEXT_HINT)
    read_labels(args.root / "labels.txt")
    summary = {}
    for split in args.splits:
        jobs = find_jobs(args.root, split)
        summary[split] = run_conversion(
            convert_image, jobs, f"Pascal Context {split}", workers=args.workers, force=args.force
        )
    print(json.dumps({"root": str(args.root), **summary}))
    return summary


if __name__ == "__main__":
    main()
