"""Semantic-segmentation evaluator for open-vocabulary benchmarks (evaluator type ``"ov_sem_seg"``).

Extends detectron2's ``SemSegEvaluator`` with: 8- or 16-bit ground truth (ADE20K-847 and Pascal
Context 459 use 16-bit TIFF with ignore 65535) whose bit depth and label range are checked; seen /
unseen mIoU and their harmonic mean when the dataset's metadata defines ``unseen_class_ids``; a
per-class IoU table (logged, and written as ``per_class_iou.csv``); predictions given either as
scores (C, H, W) or as labels (H, W), so very large vocabularies need not hold dense scores.

Where the metadata describes names by attributes (``class_attributes``, the toy world's colour and
shape), the evaluator also runs the **dense probe**: every ground-truth region (the pixels of one
class in one image) is classified by the mean of the predicted class scores over its pixels
(one-hot votes for label predictions), and the attribute probe of ``mask_classification`` (top-1,
colour, shape within colour; seen / unseen; plain and calibrated) is computed on those rows: what a
dense model recognises given perfect grouping, apart from how well it localises.
"""

import csv
import itertools
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.comm import all_gather, is_main_process, synchronize
from tabulate import tabulate

from ov_seg.data.datasets.benchmark_utils import label_bit_depth, read_label_image
from ov_seg.utils.semseg import label_map

from .build import EVALUATOR_REGISTRY
from .mask_classification import attribute_probe_metrics, calibrated_probe

__all__ = [
    "OpenVocabSemSegEvaluator",
    "sem_seg_metrics",
    "harmonic_mean",
    "region_votes",
    "vote_logits",
]

logger = logging.getLogger(__name__)

# above this many classes the per-class table goes to the CSV only, not to the log
MAX_LOGGED_CLASSES = 200
# γ grid (log units of the mean class score) of the dense probe's calibrated variant
DENSE_PROBE_GAMMAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` (0 when both are 0; NaN when either is NaN)."""
    if np.isnan(a) or np.isnan(b):
        return float("nan")
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def sem_seg_metrics(
    conf_matrix: np.ndarray,
    class_names: Sequence[str],
    seen_class_ids: Optional[Sequence[int]] = None,
    unseen_class_ids: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """Metrics (in %) from a confusion matrix, with detectron2's conventions.

    Args:
        conf_matrix: (C + 1, C + 1) int, ``[pred, gt]`` counts; the last row / column is ignore.
        class_names: C names.
        seen_class_ids, unseen_class_ids: contiguous ids of the two splits; seen defaults to the
            complement of unseen; no split when ``unseen_class_ids`` is None.

    Returns:
        ``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, ``IoU-{name}``, ``ACC-{name}``; with a split, also
        ``mIoU-seen``, ``mIoU-unseen`` and ``hIoU`` (harmonic mean of the two). A class with no
        ground-truth pixel has IoU NaN and is left out of every mean (as in detectron2).
    """
    num_classes = len(class_names)
    if conf_matrix.shape != (num_classes + 1, num_classes + 1):
        raise ValueError(
            f"confusion matrix {conf_matrix.shape} does not match {num_classes} classes"
        )
    conf = conf_matrix[:-1, :-1].astype(np.float64)
    tp = np.diagonal(conf)
    pos_gt = conf.sum(axis=0)
    pos_pred = conf.sum(axis=1)
    valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou = np.full(num_classes, np.nan)
    acc = np.full(num_classes, np.nan)
    iou[valid] = tp[valid] / union[valid]
    acc[valid] = tp[valid] / pos_gt[valid]
    total = pos_gt.sum()

    def mean(values, mask):
        return float(100 * values[mask].mean()) if mask.any() else float("nan")

    res = {
        "mIoU": mean(iou, valid),
        "fwIoU": float(100 * np.sum(iou[valid] * pos_gt[valid]) / total) if total else float("nan"),
        "mACC": mean(acc, valid),
        "pACC": float(100 * tp.sum() / total) if total else float("nan"),
    }
    if unseen_class_ids is not None:
        if seen_class_ids is None:
            seen_class_ids = sorted(set(range(num_classes)) - set(unseen_class_ids))
        for split, ids in (("seen", seen_class_ids), ("unseen", unseen_class_ids)):
            mask = np.zeros(num_classes, dtype=bool)
            mask[list(ids)] = True
            res[f"mIoU-{split}"] = mean(iou, mask & valid)
        res["hIoU"] = harmonic_mean(res["mIoU-seen"], res["mIoU-unseen"])
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = float(100 * iou[i])
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = float(100 * acc[i])
    return res


def binary_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band of a binary mask (Boundary IoU, Cheng et al. 2021): the mask pixels
    within ``d = max(1, round(dilation_ratio * image diagonal))`` pixels of its outside (the image
    border counts as outside).

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool.
    """
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h * h + w * w))))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
    return mask & (eroded == 0)


def boundary_intersection_union(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int, dilation_ratio: float = 0.02
):
    """Per-class Boundary IoU counts of one image: for each class c, the boundary bands of
    ``pred == c`` and ``gt == c`` (``binary_boundary``), pixels labelled ``ignore`` in ``gt``
    left out; intersection and union pixel counts.

    detectron2's ``SemSegEvaluator`` erodes the whole label map at once, which mixes classes (a
    pixel's "boundary label" becomes a difference of class ids); Boundary IoU is defined per class.

    Args:
        pred, gt: (H, W) integer labels; ``gt`` may hold ``ignore``.
        num_classes: C.

    Returns:
        ``(intersection, union)``, each (C,) int64.
    """
    inter = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    valid = gt != ignore
    for c in np.union1d(np.unique(pred[valid]), np.unique(gt[valid])):
        c = int(c)
        if not 0 <= c < num_classes:
            continue
        b_pred = binary_boundary(pred == c, dilation_ratio) & valid
        b_gt = binary_boundary(gt == c, dilation_ratio) & valid
        inter[c] = np.count_nonzero(b_pred & b_gt)
        union[c] = np.count_nonzero(b_pred | b_gt)
    return inter, union


def region_votes(
    sem_seg: torch.Tensor, gt: np.ndarray, num_classes: int, ignore: int
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Mean predicted class scores over each ground-truth class region of one image.

    Args:
        sem_seg: (C, H, W) class scores (probabilities) or (H, W) integer labels (one-hot votes).
        gt: (H, W) int labels; ``ignore`` pixels are left out.
        num_classes: C.
        ignore: the ignore label.

    Returns:
        rows (S, C) float32 (mean score of each class over the region) and labels (S,) int64, one
        per class present in ``gt``.
    """
    flat_gt = torch.from_numpy(np.ascontiguousarray(gt)).reshape(-1).long()
    keep = flat_gt != ignore
    present = flat_gt[keep].unique()
    if present.numel() == 0:
        return torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.long)
    # region index of each pixel (S = background slot for ignore pixels)
    slot = torch.full((num_classes + 1,), present.numel(), dtype=torch.long)
    slot[present] = torch.arange(present.numel())
    region = slot[torch.where(keep, flat_gt, torch.full_like(flat_gt, num_classes))]
    counts = torch.bincount(region, minlength=present.numel() + 1)[:-1].clamp_min(1)
    sums = torch.zeros(present.numel() + 1, num_classes)
    if sem_seg.dim() == 3:
        scores = sem_seg.detach().to("cpu", torch.float32).reshape(num_classes, -1)
        sums.index_add_(0, region, scores.t())
    else:
        labels = sem_seg.detach().to("cpu").reshape(-1).long()
        sums.index_put_((region, labels), torch.ones(labels.numel()), accumulate=True)
    return sums[:-1] / counts[:, None].float(), present


def vote_logits(rows: torch.Tensor) -> torch.Tensor:
    """The probe's logits of ``region_votes`` rows (S, C): the log of each mean score (floored at
    1e-6, so a class no pixel voted for stays finite)."""
    return rows.float().clamp_min(1e-6).log()


class OpenVocabSemSegEvaluator(SemSegEvaluator):
    """detectron2's ``SemSegEvaluator`` for 8/16-bit ground truth, with seen/unseen mIoU and hIoU.

    Dataset metadata read: ``stuff_classes``, ``ignore_label``; optional ``sem_seg_bit_depth``
    (ground truth must have exactly that depth; otherwise at least the depth that holds the ignore
    label and every class id), ``unseen_class_ids`` / ``seen_class_ids`` (seen defaults to the
    complement), ``prepare_cmd`` (named in errors about the ground truth).

    Results under ``"sem_seg"``: ``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, per-class ``IoU-*`` /
    ``ACC-*`` (and per-class ``BoundaryIoU-*`` below 255 classes), plus ``mIoU-seen``,
    ``mIoU-unseen``, ``hIoU`` with a split; with ``class_attributes`` metadata and a split, the
    dense probe under ``"dense_probe"`` / ``"dense_probe_calibrated"`` (module doc). ``output_dir``
    receives ``per_class_iou.csv``,
    ``sem_seg_evaluation.pth`` and (``save_predictions``) detectron2's ``sem_seg_predictions.json``.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        seen_class_ids: Optional[Sequence[int]] = None,
        unseen_class_ids: Optional[Sequence[int]] = None,
        save_predictions: bool = True,
    ):
        """
        Args:
            dataset_name: a registered semantic-segmentation dataset.
            distributed: gather results from all processes.
            output_dir: where results are written (None: nowhere).
            seen_class_ids, unseen_class_ids: override the metadata's split.
            save_predictions: keep RLE-encoded predictions for ``sem_seg_predictions.json`` (costly
                on large validation sets).
        """
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        meta = MetadataCatalog.get(dataset_name)
        self._prepare_cmd = meta.get("prepare_cmd", None)
        self._save_predictions = save_predictions
        needed = 16 if max(self._ignore_label, self._num_classes - 1) > 255 else 8
        self._declared_bit_depth = meta.get("sem_seg_bit_depth", None)
        self._min_bit_depth = self._declared_bit_depth or needed
        if self._min_bit_depth < needed:
            raise ValueError(
                f"{dataset_name}: sem_seg_bit_depth {self._declared_bit_depth} cannot hold ignore "
                f"label {self._ignore_label} and {self._num_classes} classes"
            )
        if unseen_class_ids is None:
            unseen_class_ids = meta.get("unseen_class_ids", None)
            if seen_class_ids is None:
                seen_class_ids = meta.get("seen_class_ids", None)
        self._seen, self._unseen = self._check_split(seen_class_ids, unseen_class_ids)
        self._attributes = dict(meta.get("class_attributes", {}) or {})
        # the calibrated dense probe leaves the stuff names alone, as EXEMPT_STUFF does
        stuff = set(meta.get("stuff_names", []) or [])
        self._calibrated_seen = [i for i in self._seen or () if self._class_names[i] not in stuff]

    def reset(self):
        super().reset()
        self._b_inter = np.zeros(self._num_classes, dtype=np.int64)
        self._b_union = np.zeros(self._num_classes, dtype=np.int64)
        self._region_rows, self._region_labels = [], []

    @property
    def _dense_probe(self) -> bool:
        return bool(self._attributes) and bool(self._unseen)

    def _check_split(self, seen, unseen):
        if unseen is None:
            if seen is not None:
                raise ValueError(f"{self._dataset_name}: seen classes given without unseen ones")
            return None, None
        unseen = sorted(int(i) for i in unseen)
        if seen is None:
            seen = sorted(set(range(self._num_classes)) - set(unseen))
        seen = sorted(int(i) for i in seen)
        for ids in (seen, unseen):
            if any(not 0 <= i < self._num_classes for i in ids):
                raise ValueError(
                    f"{self._dataset_name}: class ids outside 0..{self._num_classes - 1}"
                )
        if set(seen) & set(unseen):
            raise ValueError(f"{self._dataset_name}: classes both seen and unseen")
        return seen, unseen

    def _hint(self) -> str:
        return f" Regenerate it with: {self._prepare_cmd}" if self._prepare_cmd else ""

    def load_ground_truth(self, file_name: str) -> np.ndarray:
        """The (H, W) int64 label map of ``file_name``, bit depth and label range checked."""
        depth = label_bit_depth(file_name)
        if (self._declared_bit_depth and depth != self._declared_bit_depth) or (
            depth < self._min_bit_depth
        ):
            raise ValueError(
                f"{file_name}: {depth}-bit ground truth, dataset {self._dataset_name!r} needs "
                f"{self._min_bit_depth}-bit (ignore label {self._ignore_label}, "
                f"{self._num_classes} classes).{self._hint()}"
            )
        gt = read_label_image(file_name)
        bad = (gt >= self._num_classes) & (gt != self._ignore_label)
        if bad.any():
            raise ValueError(
                f"{file_name}: labels {np.unique(gt[bad])[:8].tolist()} are neither a class id "
                f"(0..{self._num_classes - 1}) nor the ignore label {self._ignore_label}."
                f"{self._hint()}"
            )
        return gt

    def _prediction_labels(self, sem_seg: torch.Tensor, file_name: str) -> np.ndarray:
        if sem_seg.dim() == 3:
            if sem_seg.shape[0] != self._num_classes:
                raise ValueError(
                    f"{file_name}: prediction has {sem_seg.shape[0]} channels, dataset "
                    f"{self._dataset_name!r} has {self._num_classes} classes"
                )
            sem_seg = label_map(sem_seg)
        elif sem_seg.dim() != 2 or sem_seg.is_floating_point():
            raise ValueError(
                f"{file_name}: 'sem_seg' must be scores (C, H, W) or integer labels (H, W), got "
                f"{sem_seg.dtype} {tuple(sem_seg.shape)}"
            )
        pred = sem_seg.to(self._cpu_device).numpy().astype(np.int64)
        if pred.size and (pred.min() < 0 or pred.max() >= self._num_classes):
            raise ValueError(f"{file_name}: predicted labels outside 0..{self._num_classes - 1}")
        return pred

    def process(self, inputs, outputs):
        """
        Args:
            inputs: model inputs, each with ``file_name`` (a file of the dataset).
            outputs: dicts whose ``sem_seg`` is (C, H, W) scores or (H, W) integer labels at the
                ground truth's resolution.
        """
        n = self._num_classes
        for input, output in zip(inputs, outputs):
            file_name = input["file_name"]
            if file_name not in self.input_file_to_gt_file:
                raise KeyError(f"{file_name} is not an image of dataset {self._dataset_name!r}")
            pred = self._prediction_labels(output["sem_seg"], file_name)
            gt = self.load_ground_truth(self.input_file_to_gt_file[file_name])
            if pred.shape != gt.shape:
                raise ValueError(
                    f"{file_name}: prediction {pred.shape} and ground truth {gt.shape} differ"
                )
            if self._dense_probe:
                rows, labels = region_votes(output["sem_seg"], gt, n, self._ignore_label)
                self._region_rows.append(rows)
                self._region_labels.append(labels)
            gt[gt == self._ignore_label] = n
            self._conf_matrix += np.bincount(
                (n + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=self._conf_matrix.size
            ).reshape(self._conf_matrix.shape)
            if self._compute_boundary_iou:
                inter, union = boundary_intersection_union(pred, gt, n, ignore=n)
                self._b_inter += inter
                self._b_union += union
            if self._save_predictions:
                self._predictions.extend(self.encode_json_sem_seg(pred, file_name))

    def evaluate(self):
        """Metrics of everything processed (on the main process; others return None)."""
        if self._distributed:
            synchronize()
            conf_list = all_gather(self._conf_matrix)
            b_inter_list = all_gather(self._b_inter)
            b_union_list = all_gather(self._b_union)
            predictions = all_gather(self._predictions)
            rows_list = all_gather(self._region_rows)
            labels_list = all_gather(self._region_labels)
            if not is_main_process():
                return None
            self._region_rows = list(itertools.chain(*rows_list))
            self._region_labels = list(itertools.chain(*labels_list))
            self._conf_matrix = np.sum(conf_list, axis=0)
            self._b_inter = np.sum(b_inter_list, axis=0)
            self._b_union = np.sum(b_union_list, axis=0)
            self._predictions = list(itertools.chain(*predictions))
        res = sem_seg_metrics(self._conf_matrix, self._class_names, self._seen, self._unseen)
        if self._compute_boundary_iou:
            self._add_boundary_iou(res)
        table = self.per_class_table(res)
        self._log_results(res, table)
        if self._output_dir:
            out = Path(self._output_dir)
            out.mkdir(parents=True, exist_ok=True)
            _write_csv(out / "per_class_iou.csv", table)
            if self._save_predictions:
                _write_atomic(out / "sem_seg_predictions.json", json.dumps(self._predictions))
            torch.save(res, out / "sem_seg_evaluation.pth")
        results = OrderedDict({"sem_seg": res})
        if self._dense_probe and self._region_rows:
            results.update(self.dense_probe_results())
        return results

    def dense_probe_results(self) -> Dict[str, Dict[str, float]]:
        """The attribute probe on the region votes processed so far (module doc): log of the mean
        score per class as the logits. ``dense_probe`` reads the model's outputs as they are (with
        the model's own configured γ, if any); ``dense_probe_calibrated`` subtracts a further γ
        (in those log units, chosen by 2-fold cross-validation) from the seen names other than
        the metadata's ``stuff_names``."""
        rows = vote_logits(torch.cat(self._region_rows))
        labels = torch.cat(self._region_labels)
        out = OrderedDict(
            dense_probe=dict(
                attribute_probe_metrics(rows, labels, self._attributes, self._seen, self._unseen)
            ),
            dense_probe_calibrated=dict(
                calibrated_probe(
                    rows,
                    labels,
                    self._attributes,
                    self._calibrated_seen,
                    self._unseen,
                    gammas=DENSE_PROBE_GAMMAS,
                )
            ),
        )
        for key, val in out.items():
            logger.info(
                "%s on %s: %s",
                key,
                self._dataset_name,
                ", ".join(f"{k} {v:.1f}" for k, v in val.items() if not np.isnan(v)),
            )
        return out

    def _add_boundary_iou(self, res: Dict[str, float]) -> None:
        for i, name in enumerate(self._class_names):
            union = self._b_union[i]
            b_iou = 100.0 * self._b_inter[i] / union if union > 0 else float("nan")
            res[f"BoundaryIoU-{name}"] = float(b_iou)
            res[f"min(IoU, B-Iou)-{name}"] = float(min(res[f"IoU-{name}"], b_iou))

    def per_class_table(self, res: Dict[str, float]):
        """Rows ``[id, class, split, IoU, ACC, GT pixels, predicted pixels]`` for every class."""
        conf = self._conf_matrix[:-1, :-1]
        gt_pixels, pred_pixels = conf.sum(axis=0), conf.sum(axis=1)
        unseen = set(self._unseen or ())
        rows = []
        for i, name in enumerate(self._class_names):
            split = "" if self._unseen is None else ("unseen" if i in unseen else "seen")
            rows.append(
                [
                    i,
                    name,
                    split,
                    round(res[f"IoU-{name}"], 2),
                    round(res[f"ACC-{name}"], 2),
                    int(gt_pixels[i]),
                    int(pred_pixels[i]),
                ]
            )
        return rows

    def _log_results(self, res: Dict[str, float], table) -> None:
        keys = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU", "fwIoU", "mACC", "pACC")
        summary = {k: round(res[k], 2) for k in keys if k in res}
        logger.info(f"Semantic segmentation on {self._dataset_name}: {summary}")
        if len(table) <= MAX_LOGGED_CLASSES:
            logger.info(
                "Per-class results:\n"
                + tabulate(table, headers=_TABLE_HEADER, tablefmt="pipe", floatfmt=".2f")
            )


_TABLE_HEADER = ["id", "class", "split", "IoU", "ACC", "gt_pixels", "pred_pixels"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, rows) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_TABLE_HEADER)
        writer.writerows(rows)
    os.replace(tmp, path)


@EVALUATOR_REGISTRY.register("ov_sem_seg")
@EVALUATOR_REGISTRY.register("sem_seg")
def build_open_vocab_sem_seg_evaluator(cfg, dataset_name, output_folder):
    """``OpenVocabSemSegEvaluator`` on ``dataset_name``, results to ``output_folder``.

    Also serves detectron2's "sem_seg" type (e.g. the builtin ``ade20k_sem_seg_val``): a subclass of
    ``SemSegEvaluator`` with the same metrics, plus seen / unseen / harmonic mIoU where defined."""
    return OpenVocabSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
