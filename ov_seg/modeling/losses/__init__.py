"""Losses shared by the models, as pure functions (contrastive, grouping, ...).

Import what you need from the submodules, e.g. ``from ov_seg.modeling.losses.contrastive import
info_nce``.
"""

from .contrastive import (
    all_gather_with_grad,
    clamped_logit_scale,
    contrastive_classification,
    info_nce,
)

__all__ = ["info_nce", "contrastive_classification", "clamped_logit_scale", "all_gather_with_grad"]
