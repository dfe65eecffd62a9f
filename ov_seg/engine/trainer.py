"""``Trainer``: detectron2's ``DefaultTrainer`` with ov_seg's loaders, evaluators and optimizer."""

import itertools
import logging
import os
import weakref
from typing import Any, Dict, List, Optional

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
)
from detectron2.engine.hooks import PeriodicWriter
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.data import build_dataset_mapper
from ov_seg.data.image_io import SkipUnreadableLoader, skip_unreadable
from ov_seg.evaluation import build_evaluator
from ov_seg.modeling.clip.export import ExportCLIPHook
from ov_seg.utils.threads import test_loader_workers

from .resume import capture_rng_state, preserved_rng, restore_rng_state, resume_train_loader

__all__ = ["Trainer", "build_optimizer", "OPTIMIZERS"]

logger = logging.getLogger(__name__)

# Parameter names (the attribute name inside their module) that hold embeddings: they get
# SOLVER.WEIGHT_DECAY_EMBED instead of SOLVER.WEIGHT_DECAY.
EMBEDDING_PARAM_NAMES = (
    "positional_embedding",
    "class_embedding",
    "logit_scale",
    "logit_bias",
    "prompts",
    "query_embed",
    "query_feat",
    "no_object_embedding",
    "void_embedding",
    "group_tokens",
    "absolute_pos_embed",
    "pos_embed",
    "cls_token",
    "relative_position_bias_table",
)


# SOLVER.OPTIMIZER -> (optimizer class, its keyword arguments from the config)
OPTIMIZERS = {
    "SGD": (
        torch.optim.SGD,
        lambda cfg: {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV},
    ),
    "ADAMW": (
        torch.optim.AdamW,
        lambda cfg: {"betas": tuple(cfg.SOLVER.BETAS), "eps": cfg.SOLVER.EPS},
    ),
}


def _lr_factor_func(cfg):
    """LR multiplier by parameter path: ``backbone.*`` and CLIP towers (a ``clip`` module in the
    path)."""

    def factor(name: str) -> float:
        if name.startswith("backbone."):
            return cfg.SOLVER.BACKBONE_MULTIPLIER
        if name.startswith("clip.") or ".clip." in name:
            return cfg.SOLVER.CLIP_MULTIPLIER
        return 1.0

    return factor


def _split_embedding_groups(model: torch.nn.Module, groups: List[Dict[str, Any]], weight_decay):
    """Move embedding parameters (``nn.Embedding`` weights) into groups with ``weight_decay``."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if not embed_ids:
        return groups
    out = []
    for g in groups:
        emb = [p for p in g["params"] if id(p) in embed_ids]
        rest = [p for p in g["params"] if id(p) not in embed_ids]
        if rest:
            out.append({**g, "params": rest})
        if emb:
            out.append({**g, "params": emb, "weight_decay": weight_decay})
    return out


def _full_model_clipping(optim_cls, clip_norm: float):
    """Subclass ``optim_cls`` so ``step()`` first clips the global gradient norm over all groups."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Optimizer from ``cfg.SOLVER`` through detectron2's ``get_default_optimizer_params``.

    Backbone / CLIP LR multipliers, no weight decay on norms (``WEIGHT_DECAY_NORM``) and embeddings
    (``WEIGHT_DECAY_EMBED``), SGD or AdamW (``SOLVER.OPTIMIZER``), optional gradient clipping
    (detectron2's "value"/"norm" per parameter, or "full_model" over all parameters together).
    """
    wd_embed = cfg.SOLVER.WEIGHT_DECAY_EMBED
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=_lr_factor_func(cfg),
        overrides={name: {"weight_decay": wd_embed} for name in EMBEDDING_PARAM_NAMES},
    )
    params = _split_embedding_groups(model, params, wd_embed)
    if not params:
        raise ValueError("the model has no trainable parameters")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise KeyError(f"Unknown SOLVER.OPTIMIZER {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    optim_cls, kwargs = OPTIMIZERS[name]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _full_model_clipping(optim_cls, clip.CLIP_VALUE)
        return optim_cls(params, lr=cfg.SOLVER.BASE_LR, **kwargs(cfg))
    return maybe_add_gradient_clipping(cfg, optim_cls(params, lr=cfg.SOLVER.BASE_LR, **kwargs(cfg)))


class Trainer(DefaultTrainer):
    """detectron2 ``DefaultTrainer`` with registry-dispatched mappers and evaluators.

    Multi-process training also works on CPU (gloo): detectron2's ``DefaultTrainer`` gives DDP
    ``device_ids=[local_rank]``, which DDP rejects for CPU modules, so the constructor is
    re-stated here with ``device_ids`` chosen from the model's device.

    Checkpoints also hold the RNG states; ``--resume`` restores them and the train loader's
    position, so a resumed run continues like the uninterrupted one (``ov_seg.engine.resume``).
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_gpu else None
        )
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(
            model, cfg.OUTPUT_DIR, partial=cfg.MODEL.WEIGHTS_PARTIAL, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._resumed_rng: Optional[Dict[str, Any]] = None
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True):
        """detectron2's ``resume_or_load``; a resumed run also skips the data its checkpoint
        consumed (``start_iter`` batches of this rank)."""
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            skip = self.start_iter * per_rank
            if not resume_train_loader(self._trainer.data_loader, skip, self.cfg.SEED):
                logger.warning("resumed train loader has no sampler: its data order restarts")

    def state_dict(self):
        ret = super().state_dict()
        ret["rng"] = capture_rng_state()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # restored in before_train: after building everything that draws random numbers
        self._resumed_rng = state_dict.get("rng") if comm.get_rank() == 0 else None

    def before_train(self):
        super().before_train()
        if self._resumed_rng is not None:
            self._trainer._data_loader_iter  # create the loader iterator first (as iteration 0 did)
            restore_rng_state(self._resumed_rng)
            self._resumed_rng = None

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's ``test``, leaving the global RNG states as they were (an evaluation
        during training does not change the training that follows)."""
        with preserved_rng():
            return super().test(cfg, model, evaluators)

    def build_hooks(self):
        hooks = super().build_hooks()
        for h in hooks:  # metric-writing period from RUNTIME.LOG_PERIOD
            if isinstance(h, PeriodicWriter):
                h._period = self.cfg.RUNTIME.LOG_PERIOD
        # models that train a CLIP leave <OUTPUT_DIR>/clip_export.pth for the other models to load
        hooks.append(ExportCLIPHook(self.cfg.OUTPUT_DIR))
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset_name = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) == 1 else ""
        mapper = build_dataset_mapper(cfg, is_train=True, dataset_name=dataset_name)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader; unreadable images are skipped with a warning and counted
        (``TEST.FAIL_ON_UNREADABLE_IMAGE`` makes the first one an error). ``TEST.NUM_WORKERS`` sizes
        its worker processes (``test_loader_workers``)."""
        mapper = build_dataset_mapper(cfg, is_train=False, dataset_name=dataset_name)
        loader = build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=skip_unreadable(mapper),
            num_workers=test_loader_workers(cfg),
        )
        return SkipUnreadableLoader(loader, fatal=cfg.TEST.FAIL_ON_UNREADABLE_IMAGE)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_deeplab_lr_scheduler(cfg, optimizer)
