"""Trainer dispatchers: clear errors for unknown names; optimizer groups."""

import pytest
import torch
from detectron2.data import MetadataCatalog

from ov_seg.data import build_dataset_mapper
from ov_seg.engine import Trainer, build_optimizer
from ov_seg.engine.setup import get_ov_seg_cfg


def test_unknown_evaluator_type_lists_known():
    MetadataCatalog.get("ov_seg_test_bogus_eval").set(evaluator_type="no_such_type")
    with pytest.raises(KeyError, match="known: .*sem_seg"):
        Trainer.build_evaluator(get_ov_seg_cfg(), "ov_seg_test_bogus_eval", "/tmp/x")


def test_unknown_mapper_lists_known():
    cfg = get_ov_seg_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "no_such_mapper"
    with pytest.raises(KeyError, match="known: .*semantic"):
        build_dataset_mapper(cfg, is_train=True)


def test_unknown_optimizer():
    cfg = get_ov_seg_cfg()
    cfg.SOLVER.OPTIMIZER = "LION"
    with pytest.raises(KeyError, match="ADAMW"):
        build_optimizer(cfg, torch.nn.Linear(2, 2))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.embed = torch.nn.Embedding(3, 4)
        self.head = torch.nn.Linear(4, 2)


def _group_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def test_optimizer_groups_and_full_model_clipping():
    cfg = get_ov_seg_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 0.1, 0.05
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    model = _Toy()
    opt = build_optimizer(cfg, model)
    assert _group_of(opt, model.backbone.weight)["lr"] == pytest.approx(0.01)
    assert _group_of(opt, model.head.weight)["lr"] == pytest.approx(0.1)
    assert _group_of(opt, model.head.weight)["weight_decay"] == pytest.approx(0.05)
    assert _group_of(opt, model.norm.weight)["weight_decay"] == 0.0
    assert _group_of(opt, model.embed.weight)["weight_decay"] == 0.0
    x = model.head(model.norm(model.backbone(torch.randn(8, 4)) * 100)).sum() * 1e4
    x.backward()
    before = model.head.weight.detach().clone()
    opt.step()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert total <= 0.01 + 1e-6  # gradients were clipped in place to the global norm
    assert not torch.equal(before, model.head.weight)
