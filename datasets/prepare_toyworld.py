#!/usr/bin/env python
"""Generate the toy world (the embedded default dataset) under ``$DETECTRON2_DATASETS/<name>``.

    python datasets/prepare_toyworld.py                       # 64 px default: train / val / web
    python datasets/prepare_toyworld.py --name toyworld_large --image-size 128

A split already complete with the same parameters is skipped (rerun = no-op); ``--force``
regenerates.
"""

import argparse
import json
import logging
import os
from pathlib import Path

from ov_seg.data.toyworld.generate import ToyWorldSpec, default_splits, generate_toyworld
from ov_seg.utils.threads import free_cores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", default="toyworld", help="folder under $DETECTRON2_DATASETS")
    p.add_argument("--root", default=None, help="explicit output folder (overrides --name)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--num-web", type=int, default=20000, help="caption-training (web-like) images")
    p.add_argument("--splits", nargs="+", default=None, help="subset of train val web")
    p.add_argument(
        "--web-context-fraction",
        type=float,
        default=0.0,
        help="fraction of the web split's object crops shown in context (scene pixels kept)",
    )
    p.add_argument(
        "--web-context-expand",
        type=float,
        nargs=2,
        default=(1.0, 2.5),
        metavar=("LO", "HI"),
        help="box ratio range of the context crops",
    )
    p.add_argument(
        "--web-square-crops",
        action="store_true",
        help="the web split's object crops keep the object's aspect ratio (square box), for a CLIP "
        "that classifies with MODEL.CLIP.MASK_SQUARE_CROP True",
    )
    p.add_argument("--force", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = free CPU cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = (
        Path(args.root)
        if args.root
        else Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / args.name
    )
    spec = ToyWorldSpec(image_size=args.image_size, seed=args.seed)
    spec.splits = default_splits(args.num_train, args.num_val, args.num_web)
    if args.web_context_fraction > 0:  # else the default spec: an existing split stays complete
        spec.splits["web"].context_fraction = args.web_context_fraction
        spec.splits["web"].context_expand_range = tuple(args.web_context_expand)
    if args.web_square_crops:
        spec.splits["web"].crop_square = True
    workers = args.workers or free_cores()
    records = generate_toyworld(root, spec, splits=args.splits, force=args.force, workers=workers)
    for split, rec in records.items():
        print(
            json.dumps(
                {
                    "root": str(root),
                    "split": split,
                    "images": rec["num_images"],
                    "captions": rec["num_captions"],
                    "images_per_s": rec["images_per_s"],
                }
            )
        )


if __name__ == "__main__":
    main()
