"""Class-agnostic proposal recall: AR@K at mask IoU >= 0.5 and mean best IoU per ground-truth
segment, overall and per group (seen / unseen categories, things / stuff)."""

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ov_seg.data.dataset_mappers.panoptic import VOID, read_segments

from .build import EVALUATOR_REGISTRY

__all__ = ["ProposalRecallEvaluator", "proposal_ious"]

logger = logging.getLogger(__name__)


def proposal_ious(
    segment_index: torch.Tensor, num_segments: int, masks: torch.Tensor
) -> torch.Tensor:
    """Mask IoU of every ground-truth segment with every proposal, void pixels excluded.

    Args:
        segment_index: (H, W) int64 segment index per pixel, ``VOID`` = unlabelled (excluded).
        num_segments: number of segments N.
        masks: (Q, H, W) binary proposals.

    Returns:
        (N, Q) IoUs.
    """
    valid = segment_index != VOID
    pred = masks[:, valid].float()  # (Q, P)
    gt = torch.nn.functional.one_hot(
        segment_index[valid], num_classes=num_segments
    ).T.float()  # (N, P)
    inter = gt @ pred.T
    union = gt.sum(1)[:, None] + pred.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


class ProposalRecallEvaluator(DatasetEvaluator):
    """Class-agnostic average recall of mask proposals.

    For each ground-truth segment (non-crowd panoptic segments, or one per class of a semantic map)
    the best IoU among the K highest-scoring proposals (binarised at ``mask_threshold``) is
    recorded; AR@K is the fraction of segments with best IoU >= ``iou_threshold``; ``mBestIoU`` the
    mean best IoU among the top max(K) proposals. Groups: all, ``seen`` / ``unseen`` (metadata
    ``unseen_class_ids``, when present), ``things`` / ``stuff``. Void (and crowd) pixels are
    excluded from the IoU.

    Model outputs must contain ``proposals`` with ``masks`` (Q, H, W) probabilities at the original
    image size and ``scores`` (Q,) (``ProposalMaskFormer`` with
    MODEL.MASK_FORMER.TEST.PROPOSALS_ON). Results are fractions in [0, 1] under the key
    "proposal_recall".
    """

    def __init__(
        self,
        dataset_name: str,
        top_ks: Sequence[int] = (10, 50, 100),
        iou_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        distributed: bool = True,
        output_dir: Optional[str] = None,
    ):
        """
        Args:
            dataset_name: registered dataset (panoptic or semantic ground truth).
            top_ks: numbers of proposals K.
            iou_threshold: IoU at which a segment counts as recalled.
            mask_threshold: binarisation threshold of the proposal probabilities.
            distributed: gather results from all workers.
            output_dir: where ``proposal_recall.json`` is written (optional).
        """
        if not top_ks or min(top_ks) < 1:
            raise ValueError(f"top_ks must be positive, got {top_ks}")
        self.dataset_name = dataset_name
        self.top_ks = sorted(int(k) for k in top_ks)
        self.iou_threshold = iou_threshold
        self.mask_threshold = mask_threshold
        self.distributed = distributed
        self.output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        unseen = meta.get("unseen_class_ids", None)
        self.unseen_ids = None if unseen is None else set(int(c) for c in unseen)
        self.ignore_label = meta.get("ignore_label", 255)
        self.thing_ids = set(meta.get("thing_dataset_id_to_contiguous_id", {}).values())
        self._dicts_by_file: Optional[Dict[str, dict]] = None
        self._records: List[tuple] = []

    def reset(self):
        self._records = []

    def _dataset_dict(self, inp: dict) -> dict:
        """The input if it carries ground-truth file names, else its dataset dict (by
        ``file_name``)."""
        if "pan_seg_file_name" in inp or "sem_seg_file_name" in inp:
            return inp
        if self._dicts_by_file is None:
            self._dicts_by_file = {d["file_name"]: d for d in DatasetCatalog.get(self.dataset_name)}
        if inp["file_name"] not in self._dicts_by_file:
            raise KeyError(f"{inp['file_name']} is not in dataset {self.dataset_name!r}")
        return self._dicts_by_file[inp["file_name"]]

    def _isthing(self, d: dict, classes: List[int]) -> List[bool]:
        if "pan_seg_file_name" in d:
            segs = [s for s in d["segments_info"] if not s.get("iscrowd", 0)]
            return [bool(s.get("isthing", s["category_id"] in self.thing_ids)) for s in segs]
        return [c in self.thing_ids for c in classes]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "proposals" not in out:
                raise KeyError(
                    "proposal recall needs 'proposals' in the model outputs "
                    "(MODEL.MASK_FORMER.TEST.PROPOSALS_ON True)"
                )
            d = self._dataset_dict(inp)
            index, classes = read_segments(d, self.ignore_label)
            if not classes:
                continue
            isthing = self._isthing(d, classes)
            masks = out["proposals"]["masks"]
            if tuple(masks.shape[-2:]) != index.shape:
                raise ValueError(
                    f"{d['file_name']}: proposals of size {tuple(masks.shape[-2:])} but ground "
                    f"truth of size {index.shape}; proposals must be at the original image size"
                )
            order = torch.argsort(out["proposals"]["scores"].float(), descending=True)[
                : self.top_ks[-1]
            ]
            binary = masks[order] >= self.mask_threshold
            ious = proposal_ious(
                torch.as_tensor(index, device=masks.device).long(), len(classes), binary
            )
            best = []
            for k in self.top_ks:
                sub = ious[:, :k]
                best.append(sub.max(1).values if sub.shape[1] else ious.new_zeros(len(classes)))
            best = torch.stack(best, 1).cpu().numpy()  # (N, len(top_ks))
            area = np.bincount(index[index != VOID].ravel(), minlength=len(classes))
            for c, t, b, a in zip(classes, isthing, best, area):
                if a > 0:  # a listed segment without pixels is not a target
                    self._records.append((int(c), bool(t), *map(float, b)))

    def _groups(self, records: np.ndarray) -> Dict[str, np.ndarray]:
        cats, things = records[:, 0].astype(int), records[:, 1].astype(bool)
        groups = {"": np.ones(len(records), dtype=bool)}
        if self.unseen_ids is not None:
            unseen = np.isin(cats, sorted(self.unseen_ids))
            groups["_seen"], groups["_unseen"] = ~unseen, unseen
            groups["_seen_things"] = ~unseen & things
        groups["_things"], groups["_stuff"] = things, ~things
        return groups

    def evaluate(self):
        records = self._records
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather(records, dst=0)
            if not comm.is_main_process():
                return {}
            records = list(itertools.chain(*gathered))
        if not records:
            logger.warning(
                "%s: no ground-truth segments; proposal recall not computed", self.dataset_name
            )
            return {}
        arr = np.asarray(records, dtype=np.float64)  # (num_gt, 2 + len(top_ks))
        best = arr[:, 2:]
        results = OrderedDict()
        for suffix, sel in self._groups(arr).items():
            if not sel.any():
                continue
            for j, k in enumerate(self.top_ks):
                results[f"AR@{k}{suffix}"] = float((best[sel, j] >= self.iou_threshold).mean())
            results[f"mBestIoU{suffix}"] = float(best[sel, -1].mean())
            results[f"num_gt{suffix}"] = int(sel.sum())
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "proposal_recall.json")
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
        return OrderedDict(proposal_recall=results)


@EVALUATOR_REGISTRY.register("proposal_recall")
def _proposal_recall(cfg, dataset_name, output_folder):
    return ProposalRecallEvaluator(dataset_name, distributed=True, output_dir=output_folder)
