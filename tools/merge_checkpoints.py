#!/usr/bin/env python
"""Write one checkpoint for the two-stage model from its two trained parts.

The model of ``--config-file`` is built with the trained proposal generator
(``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS``) and the adapted CLIP (``MODEL.CLIP.PRETRAINED``, an exported
checkpoint with its mask prompts), and its state dict is saved as ``{"model": ..., "meta": ...}``:

    python tools/merge_checkpoints.py --config-file configs/toyworld/two_stage_R18.yaml \\
        --output /tmp/two_stage/merged.pth \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS proposals/model_final.pth MODEL.CLIP.PRETRAINED
        clip/clip_export.pth

Use it as ``MODEL.WEIGHTS merged.pth MODEL.TWO_STAGE.PROPOSAL_WEIGHTS "" MODEL.CLIP.PRETRAINED ""``.
The written file is checked by building the model from it and comparing every tensor
(``--no-verify`` skips).
"""

import argparse
import os
from pathlib import Path

import torch
from detectron2.utils.logger import setup_logger

import ov_seg  # noqa: F401 (registration)
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine import Trainer
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.clip import clip_activation
from ov_seg.utils.threads import set_num_threads


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a TwoStageOVSeg config")
    p.add_argument("--output", required=True, help="merged checkpoint (.pth)")
    p.add_argument(
        "--no-verify", action="store_true", help="do not reload the written checkpoint to check it"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def build(config_file: str, opts):
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    if cfg.MODEL.META_ARCHITECTURE != "TwoStageOVSeg":
        raise SystemExit(
            f"{config_file} is not a TwoStageOVSeg config ({cfg.MODEL.META_ARCHITECTURE})"
        )
    return cfg, Trainer.build_model(cfg)


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="ov_seg")
    cfg, model = build(args.config_file, args.opts)
    set_num_threads(cfg.RUNTIME.NUM_THREADS)
    if cfg.MODEL.WEIGHTS:
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    if not (cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS or cfg.MODEL.WEIGHTS):
        logger.warning(
            "no proposal generator weights (MODEL.TWO_STAGE.PROPOSAL_WEIGHTS): it is random"
        )
    if not (cfg.MODEL.CLIP.PRETRAINED or cfg.MODEL.WEIGHTS):
        logger.warning("no CLIP weights (MODEL.CLIP.PRETRAINED): the CLIP is random")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "proposal_weights": cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS,
        "clip_pretrained": cfg.MODEL.CLIP.PRETRAINED,
        "clip_model_name": cfg.MODEL.CLIP.MODEL_NAME,
        "mask_prompt_depth": int(model.crop_classifier.encoder.depth),
        # read back by TwoStageOVSeg (MODEL.CLIP.ACTIVATION "auto" with PRETRAINED "")
        "clip_activation": clip_activation(model.crop_classifier.clip),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save({"model": state, "meta": meta}, tmp)
    os.replace(tmp, out)
    logger.info(
        "merged checkpoint written to %s (%d tensors, mask prompt depth %d, CLIP %s)",
        out,
        len(state),
        meta["mask_prompt_depth"],
        meta["clip_activation"],
    )
    if args.no_verify:
        return out
    opts = list(args.opts) + [
        "MODEL.WEIGHTS",
        str(out),
        "MODEL.TWO_STAGE.PROPOSAL_WEIGHTS",
        "",
        "MODEL.CLIP.PRETRAINED",
        "",
    ]
    _, reloaded = build(args.config_file, opts)
    SafeCheckpointer(reloaded).load(str(out))
    again = reloaded.state_dict()
    bad = sorted(k for k in state if k not in again or not torch.equal(state[k], again[k].cpu()))
    if bad or set(again) != set(state):
        raise SystemExit(f"verification failed: tensors differ after reloading: {bad[:10]}")
    if clip_activation(reloaded.crop_classifier.clip) != meta["clip_activation"]:
        raise SystemExit("verification failed: the reloaded CLIP has another activation")
    logger.info("verified: the model built from %s has identical weights", out)
    return out


if __name__ == "__main__":
    main()
