#!/usr/bin/env python
"""Convert ADE20K_2021_17_01 (ADE20K-Full) into the ADE20K-847 layout ov_seg registers.

    python datasets/prepare_ade20k_full_sem_seg.py     # in $DETECTRON2_DATASETS/ADE20K_2021_17_01
    python datasets/prepare_ade20k_full_sem_seg.py --source /data/ADE20K_2021_17_01 --workers 4

Reads   <source>/images/ADE/{training,validation}/**/ADE_*.jpg and each image's ``*_seg.png``
        (RGB; ADE20K object index = R // 10 * 256 + G, 0 = unlabeled)
Writes  <output>/images_detectron2/{training,validation}/ADE_*.jpg
        <output>/annotations_detectron2/{training,validation}/ADE_*.tif
        (16-bit contiguous ids 0..846; 65535 = unlabeled or an object outside the 847 classes)

As in the benchmark's release, an image whose shorter side exceeds 512 px is resized so that it is
512 (bilinear; labels nearest); other images are copied unchanged. Files are written atomically and
a rerun skips finished images (``--force`` redoes them).
"""

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ov_seg.data.datasets.benchmark_utils import (
    apply_lut,
    build_lut,
    require_path,
    run_conversion,
    save_image_atomic,
)
from ov_seg.data.datasets.register_ade20k_full import (
    ADE20K_847_CATEGORIES,
    ADE20K_FULL_DIR,
    ADE20K_FULL_IGNORE_LABEL,
    ADE20K_FULL_SPLITS,
)

DOWNLOAD_HINT = (
    "Download ADE20K_2021_17_01.zip from https://ade20k.csail.mit.edu/ (free registration) and "
    "unzip it into $DETECTRON2_DATASETS (see datasets/README.md)."
)
ADE_LUT = build_lut(
    {ade_id: i for i, (ade_id, _) in enumerate(ADE20K_847_CATEGORIES)}, ADE20K_FULL_IGNORE_LABEL
)


def decode_ade_seg(seg_path: Path) -> np.ndarray:
    """ADE20K object index (H, W) int64 of an upstream ``*_seg.png``: ``R // 10 * 256 + G``."""
    with Image.open(seg_path) as im:
        if im.mode != "RGB":
            raise ValueError(
                f"{seg_path}: expected an 8-bit RGB *_seg.png (ADE20K 2021 format, class = "
                f"R // 10 * 256 + G), got PIL mode {im.mode!r}"
            )
        rgb = np.asarray(im).astype(np.int64)
    return rgb[..., 0] // 10 * 256 + rgb[..., 1]


def resized_shape(width: int, height: int, short_side: int):
    """(width, height) with the shorter side brought down to ``short_side`` (0: unchanged)."""
    shorter = min(width, height)
    if short_side <= 0 or shorter <= short_side:
        return width, height
    scale = short_side / shorter
    return (
        short_side if width == shorter else round(width * scale),
        short_side if height == shorter else round(height * scale),
    )


def convert_image(job) -> None:
    """Write the resized image and its 847-class 16-bit label map for one upstream image."""
    labels = apply_lut(decode_ade_seg(job["seg"]), ADE_LUT, ADE20K_FULL_IGNORE_LABEL)
    with Image.open(job["image"]) as image:
        if image.size != (labels.shape[1], labels.shape[0]):
            raise ValueError(
                f"{job['image']} is {image.size[0]}x{image.size[1]} but {job['seg']} is "
                f"{labels.shape[1]}x{labels.shape[0]}"
            )
        size = resized_shape(*image.size, job["short_side"])
        out_image = Path(job["outputs"][0])
        out_image.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_image.parent / f".{out_image.name}.{os.getpid()}.tmp"
        if size == image.size:
            shutil.copyfile(job["image"], tmp)
        else:
            image.convert("RGB").resize(size, Image.BILINEAR).save(tmp, format="JPEG", quality=95)
        os.replace(tmp, out_image)
    label_image = Image.fromarray(labels)
    if size != label_image.size:
        label_image = label_image.resize(size, Image.NEAREST)
    save_image_atomic(np.asarray(label_image), Path(job["outputs"][1]), format="TIFF")


def find_jobs(source: Path, output: Path, folder: str, short_side: int):
    """One job per ``ADE_*.jpg`` under ``source/images/ADE/<folder>``."""
    split_dir = require_path(
        source / "images" / "ADE" / folder, f"ADE20K {folder} image folder", DOWNLOAD_HINT
    )
    images = sorted(split_dir.rglob("ADE_*.jpg"))
    if not images:
        raise FileNotFoundError(f"no ADE_*.jpg image under {split_dir}. {DOWNLOAD_HINT}")
    jobs = []
    for image in images:
        seg = require_path(
            image.with_name(image.stem + "_seg.png"), f"segmentation of {image.name}", DOWNLOAD_HINT
        )
        jobs.append(
            {
                "image": str(image),
                "seg": str(seg),
                "short_side": short_side,
                "outputs": [
                    str(output / "images_detectron2" / folder / image.name),
                    str(output / "annotations_detectron2" / folder / f"{image.stem}.tif"),
                ],
            }
        )
    return jobs


def main(argv=None):
    default_root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / ADE20K_FULL_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", type=Path, default=default_root, help="the unzipped upstream folder")
    p.add_argument("--output", type=Path, default=default_root, help="where the layout is written")
    p.add_argument(
        "--splits",
        nargs="+",
        default=list(ADE20K_FULL_SPLITS.values()),
        choices=["training", "validation"],
    )
    p.add_argument("--short-side", type=int, default=512, help="resize target; 0 keeps sizes")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--force", action="store_true", help="redo images already converted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_path(args.source, "ADE20K_2021_17_01 folder", DOWNLOAD_HINT)
    summary = {}
    for folder in args.splits:
        jobs = find_jobs(args.source, args.output, folder, args.short_side)
        summary[folder] = run_conversion(
            convert_image, jobs, f"ADE20K-847 {folder}", workers=args.workers, force=args.force
        )
    print(json.dumps({"output": str(args.output), **summary}))
    return summary


if __name__ == "__main__":
    main()
