#!/usr/bin/env python
"""Train / evaluate any ov_seg model (detectron2 style).

python tools/train_net.py --config-file configs/toyworld/semseg_R18.yaml MODEL.DEVICE cpu
python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
python tools/train_net.py --config-file ... --num-gpus 2   # 2 processes (gloo on CPU)
"""

import logging
import os

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

import ov_seg  # noqa: F401 (registers datasets, mappers, evaluators, models)
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine import Trainer
from ov_seg.engine.pipeline import atomic_write_json
from ov_seg.engine.setup import setup_cfg


def setup(args):
    """Frozen config for ``args`` (config file + opts), with detectron2's default setup."""
    return setup_cfg(args)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            write_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # the final evaluation's results (DefaultTrainer.train returns them only with EXPECTED_RESULTS)
    results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        write_results(cfg, results)
    return results


def write_results(cfg, results):
    """Write the evaluation results to ``OUTPUT_DIR/eval_results.json`` (atomic)."""
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    atomic_write_json(path, results)
    logging.getLogger("ov_seg").info("evaluation results written to %s", path)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
