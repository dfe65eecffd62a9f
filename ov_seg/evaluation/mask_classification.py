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

__all__ = [
    "MaskClassificationEvaluator",
    "mask_classification_metrics",
    "attribute_probe_metrics",
    "calibrated_probe",
]

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


# γ grid of the probe's seen-class calibration (logit units of the classifier: 100 · cos for the
# CLIP crop classifiers), chosen by 2-fold cross-validation over the segments
PROBE_GAMMAS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def attribute_probe_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attributes: Dict[str, List[int]],
    seen_ids=(),
    unseen_ids=(),
    gamma: float = 0.0,
) -> Dict[str, float]:
    """What a classifier reads from a name made of attributes (toy world: "red star" = colour +
    shape), on the segments whose class has every attribute.

    For the first attribute A (``colour``) and each other attribute B (``shape``):

    * ``top1``: the argmax over all names is right;
    * ``<A>``: the argmax name has the right A (chance 1 / #A values);
    * ``<B>_within_<A>``: the argmax among the names that share the segment's A has the right B:
      what the model reads beyond A (chance 1 / #names with that A; a model that knows only A
      scores chance here, a perfect one 100).

    Each for ``seen`` / ``unseen`` segments (the class of the segment), after subtracting ``gamma``
    from the seen classes' logits (calibrated stacking; 0 = the plain model).

    Args:
        logits: (N, C) scores over the vocabulary.
        labels: (N,) int64 in [0, C).
        attributes: name -> (C,) attribute index per class (-1: the class lacks it); the first
            key is the attribute the others are read within.
        seen_ids, unseen_ids: contiguous class ids of the split.

    Returns:
        ``{"<metric>_<seen|unseen>": %, "chance_<metric>": %, "segments_<seen|unseen>": n}``.
    """
    names = list(attributes)
    table = torch.as_tensor([attributes[k] for k in names], dtype=torch.long)  # (A, C)
    out: Dict[str, float] = OrderedDict()
    if len(names) < 2 or labels.numel() == 0:
        return out
    has_all = (table >= 0).all(dim=0)  # (C,)
    keep = has_all[labels]
    logits, labels = logits[keep].float(), labels[keep]
    seen = torch.zeros(table.shape[1], dtype=torch.bool)
    seen[torch.as_tensor(list(seen_ids), dtype=torch.long)] = True
    logits = logits - gamma * seen.to(logits.dtype)
    # names lacking an attribute (stuff) still compete in top-1 and the first attribute
    first = table[0]
    pred = logits.argmax(dim=1)
    same_first = first[None, :] == first[labels][:, None]  # (N, C)
    within = logits.masked_fill(~same_first, float("-inf")).argmax(dim=1)
    hits = {"top1": pred == labels, names[0]: first[pred] == first[labels]}
    for b in names[1:]:
        hits[f"{b}_within_{names[0]}"] = (
            table[names.index(b)][within] == table[names.index(b)][labels]
        )
    values = first[first >= 0].unique()
    out["chance_top1"] = 100.0 / table.shape[1]
    out[f"chance_{names[0]}"] = 100.0 / max(len(values), 1)
    per_first = has_all.sum().item() / max(len(values), 1)
    for b in names[1:]:
        out[f"chance_{b}_within_{names[0]}"] = 100.0 / max(per_first, 1)
    for split, ids in (("seen", seen_ids), ("unseen", unseen_ids)):
        sel = torch.isin(labels, torch.as_tensor(list(ids), dtype=torch.long))
        out[f"segments_{split}"] = float(sel.sum())
        for k, h in hits.items():
            out[f"{k}_{split}"] = (
                100.0 * h[sel].float().mean().item() if sel.any() else float("nan")
            )
    return out


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def calibrated_probe(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attributes: Dict[str, List[int]],
    seen_ids,
    unseen_ids,
    gammas=PROBE_GAMMAS,
) -> Dict[str, float]:
    """:func:`attribute_probe_metrics` with the seen-class calibration γ chosen by 2-fold
    cross-validation: γ maximising the harmonic mean of seen / unseen top-1 on one half of the
    segments (in order) is applied to the other half, both ways; the two halves' hits are pooled
    (weighted by their segment counts). ``gamma_fold0`` / ``gamma_fold1`` hold the picks."""
    n = labels.numel()
    halves = (slice(0, n // 2), slice(n // 2, n))
    pooled: Dict[str, float] = OrderedDict()
    picks = []
    for fit, score in (halves, halves[::-1]):
        best = max(
            gammas,
            key=lambda g: _harmonic(
                *(
                    attribute_probe_metrics(
                        logits[fit], labels[fit], attributes, seen_ids, unseen_ids, g
                    ).get(f"top1_{s}", 0.0)
                    for s in ("seen", "unseen")
                )
            ),
        )
        picks.append(best)
        m = attribute_probe_metrics(
            logits[score], labels[score], attributes, seen_ids, unseen_ids, best
        )
        for k, v in m.items():
            if k.startswith(("chance", "segments")):
                pooled[k] = pooled.get(k, 0.0) + v if k.startswith("segments") else v
                continue
            split = k.rsplit("_", 1)[1]
            w = m[f"segments_{split}"]
            if w > 0:
                pooled[k] = pooled.get(k, 0.0) + v * w
    for k in list(pooled):
        if not k.startswith(("chance", "segments")):
            pooled[k] /= max(pooled[f"segments_{k.rsplit('_', 1)[1]}"], 1)
    for i, g in enumerate(picks):
        pooled[f"gamma_fold{i}"] = float(g)
    return pooled


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
        self.attributes = dict(meta.get("class_attributes", {}) or {})
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
        logits, labels = torch.cat(logits), torch.cat(labels)
        metrics = mask_classification_metrics(logits, labels, self.seen_ids, self.unseen_ids)
        logger.info(
            "mask classification on %s: %s",
            self.dataset_name,
            ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not np.isnan(v)),
        )
        results = OrderedDict(mask_cls=dict(metrics))
        if self.attributes and self.unseen_ids:
            args = (logits, labels, self.attributes, self.seen_ids, self.unseen_ids)
            results["probe"] = dict(attribute_probe_metrics(*args))
            results["probe_calibrated"] = dict(calibrated_probe(*args))
            for key in ("probe", "probe_calibrated"):
                logger.info(
                    "attribute %s on %s: %s",
                    key,
                    self.dataset_name,
                    ", ".join(
                        f"{k} {v:.1f}"
                        for k, v in results[key].items()
                        if isinstance(v, float) and not np.isnan(v)
                    ),
                )
        return results


@EVALUATOR_REGISTRY.register("mask_classification")
def _mask_classification(cfg, dataset_name, output_folder):
    return MaskClassificationEvaluator(dataset_name)
