#!/usr/bin/env python
"""A PNG grid comparing methods on a few images: image, ground truth, then each method's prediction
and its errors.

    python tools/visualize_methods.py --dataset toyworld_sem_seg_val --num-images 6 \\
        --output grid.png \\
        --method "two-stage=configs/toyworld/two_stage_R18.yaml::MODEL.CLIP.PRETRAINED x.pth" \\
        --method "PACL=configs/toyworld/pacl.yaml:out/pacl.pth:MODEL.CLIP.PRETRAINED x.pth"

``--method NAME=CONFIG:WEIGHTS:OPTS`` (WEIGHTS may be empty; OPTS are config overrides split like a
shell command line). Images are picked from those containing unseen classes first, so unseen names
are shown.

Every tile names its regions and lists its names with their shares of the image under it, one
colour per name (not the object's colour: a wrong shape of the right colour must look wrong);
unseen names are starred. Each method's errors column shows the pixels it gets wrong against the
ground truth, its wrong share and its largest confusions
(``ov_seg.utils.visualize.comparison_row``).
"""

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ov_seg  # noqa: E402,F401 (registration)
from ov_seg.data import build_dataset_mapper  # noqa: E402
from ov_seg.engine.methods import build_method, parse_method_spec  # noqa: E402
from ov_seg.engine.setup import get_ov_seg_cfg  # noqa: E402
from ov_seg.utils.semseg import label_map  # noqa: E402
from ov_seg.utils.threads import set_num_threads  # noqa: E402
from ov_seg.utils.visualize import comparison_grid, comparison_row  # noqa: E402


def pick_images(dicts, unseen_ids, n):
    """Indices of ``n`` images, those whose ground truth holds unseen classes first."""
    scored = []
    for i, d in enumerate(dicts):
        gt = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        scored.append((-len(set(np.unique(gt).tolist()) & unseen_ids), i))
    return [i for _, i in sorted(scored)[:n]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="toyworld_sem_seg_val")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--scale", type=int, default=3, help="upscaling of each tile (nearest)")
    p.add_argument("--method", action="append", required=True, help="NAME=CONFIG:WEIGHTS:OPTS")
    p.add_argument("--output", required=True, help="PNG path")
    args = p.parse_args(argv)
    set_num_threads(0)
    meta = MetadataCatalog.get(args.dataset)
    unseen = set(meta.get("unseen_class_ids", []))
    names = [f"{n}*" if k in unseen else n for k, n in enumerate(meta.stuff_classes)]
    ignore = meta.get("ignore_label", 255)
    dicts = DatasetCatalog.get(args.dataset)
    chosen = pick_images(dicts, unseen, args.num_images)
    columns = ["image", "ground truth"]
    predictions = {i: [] for i in chosen}
    base_cfg = get_ov_seg_cfg()
    for spec in args.method:
        name, config, weights, opts = parse_method_spec(spec)
        config = str(REPO / config) if not os.path.isabs(config) else config
        cfg, model = build_method(base_cfg, config, weights, opts + ["MODEL.DEVICE", "cpu"])
        mapper = build_dataset_mapper(cfg, is_train=False, dataset_name=args.dataset)
        columns += [name, f"{name}: errors"]
        with torch.inference_mode():
            for i in chosen:
                inp = mapper(dicts[i])
                predictions[i].append(label_map(model([inp])[0]["sem_seg"]).cpu().numpy())
    rows = []
    for i in chosen:
        d = dicts[i]
        image = cv2.imread(d["file_name"])[:, :, ::-1]
        gt = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64)
        rows.append(
            comparison_row(image, gt, predictions[i], names, scale=args.scale, ignore_label=ignore)
        )
    note = (
        f"{args.dataset}: names on the regions and under each tile with their share of the "
        "image; * unseen in training; errors: wrong pixels in red, the largest confusions "
        "(true → predicted)"
    )
    grid = comparison_grid(rows, columns, note)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(args.output) + ".tmp.png"
    cv2.imwrite(tmp, grid[:, :, ::-1])
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({len(chosen)} images x {len(columns)} columns)")


if __name__ == "__main__":
    main()
