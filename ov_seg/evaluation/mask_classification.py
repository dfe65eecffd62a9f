"""Masked-crop classification accuracy (CLIP zero-shot / mask-adapted CLIP on ground-truth masks).

Consumes the ``"mask_cls"`` output of ``CLIPPretrain`` / ``MaskAdaptedCLIP`` in eval mode on inputs
of the
``mask_category`` mapper: one row of logits over the dataset vocabulary per ground-truth segment.
Reports segment accuracy overall, on seen and unseen categories (dataset metadata ``seen_class_ids``
/ ``unseen_class_ids``), their harmonic mean, the unseen accuracy when only unseen names compete,
mean class accuracy, and chance (1 / vocabulary size).
"""

import itertools
import logging
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .build import EVALUATOR_REGISTRY

__all__ = ["MaskClassificationEvaluator", "mask_classification_metrics"]

logger = logging.getLogger(__name__)


def mask_classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, seen_ids=(), unseen_ids=()
) -> Dict[str, float]:
    """Accuracies (in %) of segment predictions.

    Args:
        logits: (N, C) scores over the vocabulary (rows of empty masks all equal: counted as wrong
            unless the argmax happens to hit; pass -inf rows to force an error).
        labels: (N,) int64 in [0, C).
        seen_ids, unseen_ids: category ids of the seen / unseen split (optional).

    Returns:
        ``acc``, ``mean_class_acc``, ``chance``, ``num_segments`` and, with a split, ``acc_seen``,
        ``acc_unseen``, ``harmonic``, ``acc_unseen_among_unseen``.
    """
    n, c = logits.shape
    out = OrderedDict(num_segments=float(n), chance=100.0 / max(c, 1))
    if n == 0:
        return out
    pred = logits.argmax(dim=1)
    correct = (pred == labels).float()
    out["acc"] = 100.0 * correct.mean().item()
    present = labels.unique()
    out["mean_class_acc"] = (
        100.0 * torch.stack([correct[labels == k].mean() for k in present]).mean().item()
    )
    seen = torch.as_tensor(list(seen_ids), dtype=torch.long)
    unseen = torch.as_tensor(list(unseen_ids), dtype=torch.long)
    if unseen.numel():
        is_seen, is_unseen = torch.isin(labels, seen), torch.isin(labels, unseen)
        for name, sel in (("acc_seen", is_seen), ("acc_unseen", is_unseen)):
            out[name] = 100.0 * correct[sel].mean().item() if sel.any() else float("nan")
        s, u = out["acc_seen"], out["acc_unseen"]
        out["harmonic"] = 2 * s * u / (s + u) if s + u > 0 else 0.0
        if is_unseen.any():
            sub = logits[is_unseen][:, unseen]
            out["acc_unseen_among_unseen"] = (
                100.0 * (unseen[sub.argmax(dim=1)] == labels[is_unseen]).float().mean().item()
            )
            out["chance_unseen_among_unseen"] = 100.0 / unseen.numel()
    return out


class MaskClassificationEvaluator(DatasetEvaluator):
    """Accumulates ``outputs[i]["mask_cls"] = {"logits": (K, C), "labels": (K,)}``; labels -1 are
    skipped.

    Args:
        dataset_name: registered dataset (metadata ``seen_class_ids`` / ``unseen_class_ids``
            optional).
        distributed: gather the predictions of all workers before computing the metrics.
    """

    def __init__(self, dataset_name: str, distributed: bool = True):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.seen_ids = list(meta.get("seen_class_ids", []) or [])
        self.unseen_ids = list(meta.get("unseen_class_ids", []) or [])
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []

    def process(self, inputs, outputs):
        for out in outputs:
            res = out.get("mask_cls")
            if res is None:
                raise KeyError(
                    "the mask_classification evaluator needs model outputs with 'mask_cls'"
                )
            labels = res["labels"].to("cpu")
            keep = labels >= 0
            self._logits.append(res["logits"].to("cpu", torch.float32)[keep])
            self._labels.append(labels[keep])

    def evaluate(self):
        logits, labels = self._logits, self._labels
        if self.distributed:
            comm.synchronize()
            logits = list(itertools.chain(*comm.gather(logits)))
            labels = list(itertools.chain(*comm.gather(labels)))
            if not comm.is_main_process():
                return {}
        if not logits:
            logger.warning("mask_classification: no segments to evaluate on %s", self.dataset_name)
            return {}
        metrics = mask_classification_metrics(
            torch.cat(logits), torch.cat(labels), self.seen_ids, self.unseen_ids
        )
        logger.info(
            "mask classification on %s: %s",
            self.dataset_name,
            ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not np.isnan(v)),
        )
        return OrderedDict(mask_cls=dict(metrics))


@EVALUATOR_REGISTRY.register("mask_classification")
def _mask_classification(cfg, dataset_name, output_folder):
    return MaskClassificationEvaluator(dataset_name)
