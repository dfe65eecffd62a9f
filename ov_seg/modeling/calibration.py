"""Calibrated stacking of seen-class scores (Chao et al., "An Empirical Study and Analysis of
Generalized Zero-Shot Learning for Object Recognition in the Wild", ECCV 2016).

A model trained on seen names scores them higher than names it never met, whatever the image shows:
in the generalized setting (seen and unseen names compete) unseen classes are rarely predicted.
Calibrated stacking subtracts a constant γ from the logit of every seen name before the class
softmax / argmax:

    logits'_k = logits_k − γ · [name_k is seen]

γ = 0 is the plain model. The seen names are the names the model was trained with (for
caption-trained models: the names that occur in the training captions); datasets with an open-
vocabulary split list them as ``seen_classes`` metadata. γ is chosen on held-out images
(``tools/search_calibration.py``), never on the evaluation images themselves.
"""

from typing import Iterable, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog

__all__ = ["SeenCalibration", "seen_names_from_metadata", "trained_names"]


def seen_names_from_metadata(dataset_names: Iterable[str], key: str = "seen_classes") -> tuple:
    """Union of the ``key`` metadata (default ``seen_classes``) of the registered
    ``dataset_names`` (in order, no duplicates); datasets without it contribute nothing."""
    names = {}
    for dataset in dataset_names:
        for name in MetadataCatalog.get(dataset).get(key, None) or ():
            names[name] = None
    return tuple(names)


def trained_names(cfg) -> tuple:
    """The names a model of ``cfg`` was trained with: ``MODEL.SEEN_CALIBRATION.SEEN_NAMES``, else
    the ``seen_classes`` metadata of its test and training datasets."""
    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return tuple(cfg.MODEL.SEEN_CALIBRATION.SEEN_NAMES) or seen_names_from_metadata(datasets)


class SeenCalibration:
    """The per-class bias −γ · [seen] of a vocabulary, added to class logits."""

    @configurable
    def __init__(
        self,
        *,
        gamma: float = 0.0,
        seen_names: Sequence[str] = (),
        exempt_names: Sequence[str] = (),
    ):
        """
        Args:
            gamma: logit units subtracted from every seen name's logit (0: off). Mutable (a search
                sets it between evaluations).
            seen_names: the names the model was trained with.
            exempt_names: seen names left uncalibrated (stuff when no unseen name is stuff: a
                lower "grass" only hands grass pixels to unseen things).
        """
        calibrated = frozenset(seen_names) - frozenset(exempt_names)
        if gamma < 0:
            raise ValueError(f"calibration gamma must be >= 0, got {gamma}")
        if gamma > 0 and not calibrated:
            raise ValueError(
                "seen-class calibration (MODEL.SEEN_CALIBRATION.GAMMA > 0) needs seen names that "
                "are not exempt (MODEL.SEEN_CALIBRATION.EXEMPT_STUFF): set "
                "MODEL.SEEN_CALIBRATION.SEEN_NAMES or use DATASETS whose metadata lists "
                "seen_classes"
            )
        self.gamma = float(gamma)
        self.seen_names = calibrated

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.SEEN_CALIBRATION
        datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
        exempt = seen_names_from_metadata(datasets, "stuff_names") if node.EXEMPT_STUFF else ()
        return {"gamma": node.GAMMA, "seen_names": trained_names(cfg), "exempt_names": exempt}

    @property
    def enabled(self) -> bool:
        return self.gamma > 0

    def bias(self, vocabulary: Sequence[str], device=None, dtype=torch.float32) -> torch.Tensor:
        """(K,) tensor: −γ for the seen names of ``vocabulary``, 0 for the others."""
        seen = torch.tensor([name in self.seen_names for name in vocabulary], device=device)
        return seen.to(dtype) * -self.gamma

    def apply(self, logits: torch.Tensor, vocabulary: Sequence[str], dim: int = 0) -> torch.Tensor:
        """``logits`` with the bias of ``vocabulary`` added along ``dim`` (the K class axis);
        returned unchanged when γ = 0.

        Args:
            logits: (..., K, ...) class logits, K = len(vocabulary) at ``dim``.
        """
        if not self.enabled:
            return logits
        if logits.shape[dim] != len(vocabulary):
            raise ValueError(
                f"logits have {logits.shape[dim]} classes at dim {dim}, the vocabulary "
                f"{len(vocabulary)}"
            )
        shape = [1] * logits.dim()
        shape[dim] = len(vocabulary)
        return logits + self.bias(vocabulary, logits.device, logits.dtype).view(shape)

    def __repr__(self) -> str:
        return f"SeenCalibration(gamma={self.gamma}, {len(self.seen_names)} seen names)"
