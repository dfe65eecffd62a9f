#!/usr/bin/env python
"""Write the standalone CLIP checkpoint of a trained CLIPPretrain / MaskAdaptedCLIP run.

    python tools/export_clip.py --config-file configs/toyworld/clip_pretrain.yaml OUTPUT_DIR
    /tmp/clip/run1 # reads <OUTPUT_DIR>/model_final.pth (or MODEL.WEIGHTS), writes
    <OUTPUT_DIR>/clip_export.pth

Other models then use ``MODEL.CLIP.PRETRAINED <OUTPUT_DIR>/clip_export.pth``.
"""

import os
import sys

from detectron2.engine import default_argument_parser

import ov_seg  # noqa: F401 (registration)
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine import Trainer
from ov_seg.engine.setup import setup_cfg
from ov_seg.modeling.clip.export import EXPORT_NAME, export_clip


def main(args):
    cfg = setup_cfg(args, default_setup_enabled=False)
    weights = cfg.MODEL.WEIGHTS or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(weights):
        sys.exit(f"no trained weights at {weights} (train first, or set MODEL.WEIGHTS)")
    model = Trainer.build_model(cfg)
    SafeCheckpointer(model).load(weights)
    path = args.output or os.path.join(cfg.OUTPUT_DIR, EXPORT_NAME)
    export_clip(model, path)
    print(path)
    return path


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--output", default="", help="checkpoint path (default <OUTPUT_DIR>/clip_export.pth)"
    )
    main(parser.parse_args())
