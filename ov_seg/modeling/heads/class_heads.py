"""Class heads of the MaskFormer proposal generator: query embeddings → class logits + "no object".

Both heads map decoder outputs (..., Q, d) to logits (..., Q, K + 1) whose last column is "no object", and
convert dataset labels to training labels (``training_labels``).
"""

from typing import List, Optional, Sequence

import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

from ov_seg.modeling.transformer_decoder.layers import MLP
from ov_seg.utils.registry import NamedRegistry, get_registered

__all__ = [
    "CLASS_HEAD_REGISTRY",
    "build_class_head",
    "ClassAgnosticHead",
    "OpenVocabClassHead",
]

CLASS_HEAD_REGISTRY = NamedRegistry("CLASS_HEAD")
CLASS_HEAD_REGISTRY.__doc__ = """
Registry of MaskFormer class heads, chosen by ``MODEL.MASK_FORMER.CLASS_HEAD.NAME``.
A registered class is ``@configurable`` with ``from_config(cls, cfg)``; it is called as
``head(query_embeds (..., Q, d), vocabulary) -> logits (..., Q, K + 1)`` (last column: no object) and has
``class_agnostic: bool`` and ``training_labels(labels, vocabulary) -> labels in [0, K)``.
"""


def build_class_head(cfg) -> nn.Module:
    """The class head named by ``cfg.MODEL.MASK_FORMER.CLASS_HEAD.NAME``."""
    name = cfg.MODEL.MASK_FORMER.CLASS_HEAD.NAME
    cls = get_registered(CLASS_HEAD_REGISTRY, name, "class head (MODEL.MASK_FORMER.CLASS_HEAD.NAME)")
    return cls(cfg)


@CLASS_HEAD_REGISTRY.register("class_agnostic")
class ClassAgnosticHead(nn.Module):
    """One "object" class + no object: a linear layer to 2 logits; every segment is an "object"."""

    class_agnostic = True

    @configurable
    def __init__(self, *, hidden_dim: int):
        """
        Args:
            hidden_dim: width d of the query embeddings.
        """
        super().__init__()
        self.classifier = nn.Linear(hidden_dim, 2)

    @classmethod
    def from_config(cls, cfg):
        return {"hidden_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM}

    def forward(self, query_embeds: torch.Tensor, vocabulary: Optional[Sequence[str]] = None):
        """
        Args:
            query_embeds: (..., Q, d) decoder outputs.
            vocabulary: ignored (the head has one class).

        Returns:
            (..., Q, 2) logits: [object, no object].
        """
        return self.classifier(query_embeds)

    def training_labels(self, labels: torch.Tensor, vocabulary: Optional[Sequence[str]] = None):
        """Every segment is class 0 ("object"). labels: (N,) → (N,) zeros."""
        return torch.zeros_like(labels)
