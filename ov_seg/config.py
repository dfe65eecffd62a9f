"""Config nodes of ov_seg.

One ``add_*_config`` function per config node, every key commented. ``add_ov_seg_config`` applies all of
them; later modules add their node here and append the adder to ``_ADDERS``.
"""

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_ov_seg_config"]


def add_solver_config(cfg):
    """Optimizer / schedule keys beyond detectron2's (MaskFormer-style)."""
    # Optimizer type: one of "SGD", "ADAMW" (dispatched in Trainer.build_optimizer).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # LR multiplier for parameters whose name starts with "backbone." (R101c in OVSeg: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # LR multiplier for parameters of CLIP towers that are trained (fine-tuning a pretrained CLIP).
    cfg.SOLVER.CLIP_MULTIPLIER = 1.0
    # Weight decay for embedding parameters (positional / query / prompt embeddings, logit scales).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # AdamW betas (beta1, beta2); CLIP training uses (0.9, 0.98).
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # AdamW epsilon.
    cfg.SOLVER.EPS = 1e-8
    # Gradient clipping: detectron2's SOLVER.CLIP_GRADIENTS, plus CLIP_TYPE "full_model" which clips the
    # global norm over all parameters together (MaskFormer / OVSeg use full_model with CLIP_VALUE 0.01).
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"


def add_input_config(cfg):
    """Data-loading keys."""
    # Dataset mapper used by the train / test loaders, by name (see ov_seg.data.dataset_mappers):
    # "semantic", "panoptic", "caption", "mask_category", or "detectron2" for detectron2's DatasetMapper.
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Mapper used at test time ("" = same as DATASET_MAPPER_NAME).
    cfg.INPUT.TEST_DATASET_MAPPER_NAME = ""
    # Pad images to a multiple of this size in the batch (-1 = the backbone's size_divisibility).
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Photometric augmentation (brightness / contrast / saturation jitter) in training mappers.
    cfg.INPUT.COLOR_AUG_SSD = False


def add_runtime_config(cfg):
    """Process-level keys."""
    cfg.RUNTIME = CN()
    # torch intra-op threads per process; 0 = the CPU cores free for this process (cores / processes).
    cfg.RUNTIME.NUM_THREADS = 0
    # Iterations between metric writes (console, metrics.json) in training.
    cfg.RUNTIME.LOG_PERIOD = 20


_ADDERS = [add_deeplab_config, add_solver_config, add_input_config, add_runtime_config]


def add_ov_seg_config(cfg):
    """Add detectron2's DeepLab keys (WarmupPolyLR: SOLVER.POLY_LR_POWER / POLY_LR_CONSTANT_ENDING,
    INPUT.CROP.SINGLE_CATEGORY_MAX_AREA) and every ov_seg config node to ``cfg`` (a detectron2 CfgNode from ``get_cfg()``)."""
    for adder in _ADDERS:
        adder(cfg)
    return cfg
