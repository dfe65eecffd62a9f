#!/usr/bin/env python
"""Where a CLIP's recognition lives: the attribute probe (top-1, colour, shape within colour; seen /
unseen) of several readouts of ground-truth regions (``ov_seg.evaluation.clip_readouts``): masked
crops at several box ratios, the tight box in context, the masked scene, the dense patch tokens.

    python tools/probe_clip_readouts.py --clip output/clip_pretrain/clip_export.pth \\
        --num-images 150 --output /tmp/readouts.json
"""

import argparse
import json

from tabulate import tabulate

import ov_seg  # noqa: F401 (registers the datasets)
from ov_seg.engine.pipeline import atomic_write_json
from ov_seg.evaluation.clip_readouts import clip_readouts
from ov_seg.modeling.clip import build_clip, resolve_templates
from ov_seg.utils.threads import set_num_threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clip", required=True, help="CLIP checkpoint (an export or an OpenCLIP tag)")
    p.add_argument("--model-name", default="ovseg-tiny-vit8-64", help="CLIP architecture")
    p.add_argument("--templates", default="toyworld", help="template set name")
    p.add_argument("--dataset", default="toyworld_sem_seg_val")
    p.add_argument("--num-images", type=int, default=0, help="first N images (0 = all)")
    p.add_argument("--scene-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = free cores)")
    p.add_argument("--output", default="", help="JSON file for the results")
    args = p.parse_args(argv)
    set_num_threads(args.threads)
    clip = build_clip(args.model_name, args.clip).eval()
    results = clip_readouts(
        clip, args.dataset, resolve_templates(args.templates), args.num_images, args.scene_sizes
    )
    rows = [
        [name]
        + [
            f"{m[f'{k}_seen']:.1f} / {m[f'{k}_unseen']:.1f}"
            for k in ("top1", "colour", "shape_within_colour")
        ]
        for name, m in results.items()
    ]
    first = next(iter(results.values()))
    rows.append(
        ["chance"]
        + [
            f"{first[k]:.1f}"
            for k in ("chance_top1", "chance_colour", "chance_shape_within_colour")
        ]
    )
    print(
        tabulate(
            rows,
            headers=["readout", "top-1 seen / unseen", "colour", "shape within colour"],
            tablefmt="pipe",
        )
    )
    if args.output:
        atomic_write_json(args.output, {"clip": args.clip, "dataset": args.dataset, **results})
        print(json.dumps({"output": args.output}))


if __name__ == "__main__":
    main()
