"""Class heads of the MaskFormer proposal generator: query embeddings → class logits + "no object".

Both heads map decoder outputs (..., Q, d) to logits (..., Q, K + 1) whose last column is "no
object", and convert dataset labels to training labels (``training_labels``).
"""

import logging
from typing import Optional, Sequence

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

logger = logging.getLogger(__name__)

CLASS_HEAD_REGISTRY = NamedRegistry("CLASS_HEAD")
CLASS_HEAD_REGISTRY.__doc__ = """
Registry of MaskFormer class heads, chosen by ``MODEL.MASK_FORMER.CLASS_HEAD.NAME``.
A registered class is ``@configurable`` with ``from_config(cls, cfg)``; it is called as
``head(query_embeds (..., Q, d), vocabulary) -> logits (..., Q, K + 1)`` (last column: no object)
and has ``class_agnostic: bool``, ``uses_clip: bool`` (its ``from_config`` takes ``clip_model``) and
``training_labels(labels, vocabulary) -> labels in [0, K)``.
"""


def build_class_head(cfg, clip_model: Optional[nn.Module] = None) -> nn.Module:
    """The class head named by ``cfg.MODEL.MASK_FORMER.CLASS_HEAD.NAME``.

    Args:
        clip_model: an already built open_clip model whose text tower the open-vocabulary head
            should use (default: the head builds ``MODEL.CLIP``'s); ignored by heads without text
            embeddings.
    """
    name = cfg.MODEL.MASK_FORMER.CLASS_HEAD.NAME
    cls = get_registered(
        CLASS_HEAD_REGISTRY, name, "class head (MODEL.MASK_FORMER.CLASS_HEAD.NAME)"
    )
    if clip_model is not None and cls.uses_clip:
        return cls(cfg, clip_model=clip_model)
    return cls(cfg)


@CLASS_HEAD_REGISTRY.register("class_agnostic")
class ClassAgnosticHead(nn.Module):
    """One "object" class + no object: a linear layer to 2 logits; every segment is an "object"."""

    class_agnostic = True
    uses_clip = False

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


@CLASS_HEAD_REGISTRY.register("open_vocab")
class OpenVocabClassHead(nn.Module):
    """OVSeg's open-vocabulary class head.

    query (d) → MLP(d → hidden → D) → L2-normalise; logits = τ · cos(query, t_k) for the CLIP text
    embedding t_k of each class name (``TextClassifier``: prompt-ensembled, frozen, cached per
    vocabulary) and τ · cos(query, n) for a learnable "no object" embedding n (init N(0, 1/D)); τ
    fixed (100).

    The CLIP model is referenced by the text classifier, not owned: checkpoints of the head hold the
    MLP and the no-object embedding only; the CLIP comes from ``MODEL.CLIP`` (``build_clip``) at
    build time.
    """

    class_agnostic = False
    uses_clip = True

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        embed_hidden_dim: int,
        text_classifier: nn.Module,
        logit_scale: float,
    ):
        """
        Args:
            hidden_dim: width d of the query embeddings.
            embed_hidden_dim: hidden width of the projection MLP (OVSeg: 1024).
            text_classifier: ``TextClassifier(clip_model, templates, void=True)``: vocabulary → (K +
                1, D) L2-normalised rows, the last one the no-object embedding.
            logit_scale: the fixed temperature τ.
        """
        super().__init__()
        if getattr(text_classifier, "void_embedding", None) is None:
            raise ValueError("the open-vocabulary head needs a TextClassifier built with void=True")
        embed_dim = text_classifier.void_embedding.shape[-1]
        self.projection = MLP(hidden_dim, embed_hidden_dim, embed_dim, 2)
        self.text_classifier = text_classifier
        self.logit_scale = logit_scale

    @classmethod
    def from_config(cls, cfg, clip_model: Optional[nn.Module] = None):
        from ov_seg.modeling.clip import TextClassifier, build_clip_from_cfg

        if clip_model is None:
            if not cfg.MODEL.CLIP.PRETRAINED:
                logger.warning(
                    "MODEL.CLIP.PRETRAINED is empty: the open-vocabulary class head embeds class "
                    "names with a randomly initialised CLIP text tower"
                )
            clip_model = build_clip_from_cfg(cfg)
        head = cfg.MODEL.MASK_FORMER.CLASS_HEAD
        return {
            "hidden_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "embed_hidden_dim": head.EMBED_HIDDEN_DIM,
            "text_classifier": TextClassifier(
                clip_model,
                cfg.MODEL.CLIP.TEMPLATES,
                void=True,
                cache_dir=cfg.MODEL.CLIP.TEXT_CACHE_DIR,
            ),
            "logit_scale": head.LOGIT_SCALE,
        }

    def forward(self, query_embeds: torch.Tensor, vocabulary: Sequence[str]) -> torch.Tensor:
        """
        Args:
            query_embeds: (..., Q, d) decoder outputs.
            vocabulary: K class names.

        Returns:
            (..., Q, K + 1) logits, the last column "no object".
        """
        if not vocabulary:
            raise ValueError(
                "the open-vocabulary head needs class names: give inputs a 'vocabulary' or train "
                "on a dataset with stuff_classes metadata"
            )
        classifier = self.text_classifier(list(vocabulary))  # (K + 1, D)
        queries = F.normalize(self.projection(query_embeds), dim=-1)
        return self.logit_scale * queries @ classifier.to(queries.dtype).T

    def training_labels(self, labels: torch.Tensor, vocabulary: Optional[Sequence[str]] = None):
        """Dataset labels are indices into the batch vocabulary: unchanged. labels: (N,)."""
        return labels
