#!/usr/bin/env python
"""Write a panoptic dataset's ground-truth segments as precomputed proposals (the oracle input of
the two-stage model: classification alone, no proposal errors).

    python tools/gt_proposals.py --dataset toyworld_panoptic_val --output out/gt_proposals
    python tools/train_net.py --config-file configs/toyworld/two_stage_R18.yaml --eval-only \\
        MODEL.TWO_STAGE.PROPOSAL_SOURCE precomputed MODEL.TWO_STAGE.PROPOSAL_DIR out/gt_proposals \\
        MODEL.TWO_STAGE.ENSEMBLE_WEIGHT 1.0 MODEL.CLIP.PRETRAINED <clip_mpt>/clip_export.pth
"""

import argparse
import json

import ov_seg  # noqa: F401 (registers the datasets)
from ov_seg.modeling.proposal_sources import write_ground_truth_proposals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="registered panoptic dataset")
    p.add_argument("--output", required=True, help="folder for <image stem>.npz files")
    args = p.parse_args(argv)
    n = write_ground_truth_proposals(args.dataset, args.output)
    print(json.dumps({"dataset": args.dataset, "output": args.output, "images": n}))


if __name__ == "__main__":
    main()
