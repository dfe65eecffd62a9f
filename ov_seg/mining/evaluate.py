"""Mining precision: how many mined pairs name what their mask shows (needs ground truth)."""

from collections import Counter
from typing import Dict

import numpy as np
import pycocotools.mask as mask_util

__all__ = ["mining_precision"]


def mining_precision(pairs: dict, gt_dataset: str, iou_thr: float = 0.5) -> Dict[str, float]:
    """Fraction of mined pairs whose mask matches a ground-truth segment of the named category.

    A pair is correct when its mask has IoU >= ``iou_thr`` with a ground-truth segment (one per
    panoptic segment, or per class of a semantic map) whose class name equals the pair's noun.

    Args:
        pairs: the content of a mining job's ``pairs.json``.
        gt_dataset: a registered panoptic or semantic dataset with the same image ids (names from
        its
            ``stuff_classes``).
        iou_thr: IoU threshold.

    Returns:
        ``precision``; ``noun_in_image`` (the noun names a category present in the image: the
        extraction is right, the assignment may not be); ``precision_given_noun`` (precision among
        those); ``mean_iou`` of the best same-name segment (0 when none); ``num_pairs``;
        ``num_images``; and per noun kind ``precision_<kind>`` for the dataset's ``isthing`` split
        when it has one ("thing" / "stuff").
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ov_seg.data.dataset_mappers.panoptic import read_segments

    meta = MetadataCatalog.get(gt_dataset)
    classes = list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])
    stuff_names = set()
    if meta.get("stuff_dataset_id_to_contiguous_id", None):
        stuff_names = {classes[c] for c in meta.stuff_dataset_id_to_contiguous_id.values()}
    by_id = {d["image_id"]: d for d in DatasetCatalog.get(gt_dataset)}
    anns: Dict = {}
    for ann in pairs["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    hits: Counter = Counter()
    totals: Counter = Counter()
    present = correct = 0
    ious = []
    for image_id, image_anns in anns.items():
        d = by_id.get(image_id)
        if d is None:
            raise KeyError(f"image_id {image_id!r} of the mined pairs is not in {gt_dataset!r}")
        index, seg_classes = read_segments(d, meta.get("ignore_label", 255))
        names = [classes[c] for c in seg_classes]
        for ann in image_anns:
            m = mask_util.decode(ann["segmentation"]).astype(bool)
            best = 0.0
            same = [j for j, n in enumerate(names) if n == ann["category"]]
            for j in same:
                gt = index == j
                union = np.logical_or(m, gt).sum()
                best = max(best, float(np.logical_and(m, gt).sum() / union) if union else 0.0)
            ok = best >= iou_thr
            present += bool(same)
            correct += ok
            ious.append(best)
            kind = "stuff" if ann["category"] in stuff_names else "thing"
            totals[kind] += 1
            hits[kind] += ok
    n = len(ious)
    out = {
        "precision": correct / max(1, n),
        "noun_in_image": present / max(1, n),
        "precision_given_noun": correct / max(1, present),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "num_pairs": n,
        "num_images": len(anns),
    }
    if stuff_names:
        for kind in ("thing", "stuff"):
            out[f"precision_{kind}"] = hits[kind] / max(1, totals[kind])
            out[f"num_pairs_{kind}"] = totals[kind]
    return out
