"""Mask-category pair mapper: (binary mask, category name) pairs of an image, for mask-adapted CLIP.

Pairs come from, in this order of precedence:

- ``pairs``: mined pairs, ``[{"segmentation": COCO RLE or polygons, "category": str}, ...]`` (the
format
  caption mining writes; the names need not be in any vocabulary);
- ``pan_seg_file_name`` + ``segments_info``: one pair per ground-truth segment (``GROUPING
"instance"``) or
  per category present (``"semantic"``), named by the dataset's ``stuff_classes``;
- ``sem_seg_file_name``: one pair per category present.
"""

import copy
from typing import List, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .build import DATASET_MAPPER_REGISTRY
from .caption import read_rgb_or_bgr
from .panoptic import VOID, read_segments
from .semantic import build_semantic_augmentations

__all__ = ["MaskCategoryDatasetMapper", "decode_segmentation"]


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO RLE (dict, counts as str or list) or polygons (list of flat xy lists) -> (H, W) bool."""
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_util.frPyObjects(rle, height, width)
    elif isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    else:
        raise TypeError(
            f"segmentation must be a COCO RLE dict or polygons, got {type(segmentation)}"
        )
    return mask_util.decode(rle).astype(bool)


@DATASET_MAPPER_REGISTRY.register("mask_category")
class MaskCategoryDatasetMapper:
    """Map a dataset dict to an image and its (mask, category) pairs.

    Output fields: ``image`` (3, H, W) uint8 in ``INPUT.FORMAT`` after augmentation; ``masks`` (K,
    H, W) bool; ``categories`` (K names); ``category_ids`` (K,) int64, the index of each name in
    ``vocabulary`` (-1 for a name outside it); ``vocabulary`` (the dataset's ``stuff_classes``, or
    ``thing_classes``); ``height``/``width``; ``dataset_name``. Segments smaller than ``min_area``
    pixels after augmentation are dropped; in training at most ``max_pairs`` random pairs are kept.
    Evaluation uses the same pairs (no random subset), which makes it a masked-crop classification
    benchmark on ground-truth masks.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations,
        image_format: str,
        ignore_label: int,
        min_area: int = 16,
        grouping: str = "instance",
        max_pairs: int = 0,
        dataset_name: str = "",
    ):
        if grouping not in ("instance", "semantic"):
            raise ValueError(
                f"INPUT.MASK_CATEGORY.GROUPING must be 'instance' or 'semantic', got {grouping!r}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.min_area = int(min_area)
        self.grouping = grouping
        self.max_pairs = int(max_pairs)
        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name) if dataset_name else None
        self.ignore_label = meta.get("ignore_label", ignore_label) if meta else ignore_label
        vocab = (
            (meta.get("stuff_classes", None) or meta.get("thing_classes", None)) if meta else None
        )
        self.vocabulary = list(vocab or [])
        self._index = {name: i for i, name in enumerate(self.vocabulary)}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        mc = cfg.INPUT.MASK_CATEGORY
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentations(cfg, is_train) if is_train else [],
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "min_area": mc.MIN_AREA,
            "grouping": mc.GROUPING,
            "max_pairs": mc.MAX_PAIRS,
            "dataset_name": dataset_name,
        }

    def _segment_pairs(
        self, dataset_dict: dict, image: np.ndarray
    ) -> Tuple[np.ndarray, List[str], object]:
        """Ground-truth pairs: (image, names, masks), the segment map augmented like the image."""
        index, classes = read_segments(dataset_dict, self.ignore_label)
        if self.grouping == "semantic" and "pan_seg_file_name" in dataset_dict:
            merged = sorted(set(classes))
            remap = np.full(256, VOID, dtype=np.uint8)
            for j, c in enumerate(classes):
                remap[j] = merged.index(c)
            index, classes = remap[index], merged
        missing = [c for c in classes if not 0 <= c < len(self.vocabulary)]
        if missing:
            raise KeyError(
                f"{dataset_dict.get('file_name')}: category ids {missing} have no name in the "
                f"vocabulary of dataset {self.dataset_name!r} ({len(self.vocabulary)} names)"
            )
        aug_input = T.AugInput(image, sem_seg=index)
        self.augmentations(aug_input)
        index = torch.from_numpy(np.ascontiguousarray(aug_input.sem_seg))
        masks = index.unsqueeze(0) == torch.arange(len(classes), dtype=index.dtype).view(-1, 1, 1)
        return aug_input.image, [self.vocabulary[c] for c in classes], masks

    def _mined_pairs(self, dataset_dict: dict, image: np.ndarray):
        h, w = image.shape[:2]
        pairs = dataset_dict["pairs"]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        masks = []
        for p in pairs:
            m = decode_segmentation(p["segmentation"], h, w).astype(np.uint8)
            masks.append(
                torch.from_numpy(np.ascontiguousarray(transforms.apply_segmentation(m))) > 0
            )
        out_shape = aug_input.image.shape[:2]
        masks = torch.stack(masks) if masks else torch.zeros((0, *out_shape), dtype=torch.bool)
        return aug_input.image, [str(p["category"]) for p in pairs], masks

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_rgb_or_bgr(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        if "pairs" in dataset_dict:
            image, names, masks = self._mined_pairs(dataset_dict, image)
        else:
            image, names, masks = self._segment_pairs(dataset_dict, image)
        keep = masks.flatten(1).sum(dim=1) >= max(1, self.min_area)
        if self.is_train and self.max_pairs > 0 and int(keep.sum()) > self.max_pairs:
            kept = keep.nonzero()[:, 0]
            keep = torch.zeros_like(keep)
            keep[kept[torch.randperm(len(kept))[: self.max_pairs]]] = True
        masks = masks[keep]
        names = [n for n, k in zip(names, keep.tolist()) if k]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["masks"] = masks
        dataset_dict["categories"] = names
        dataset_dict["category_ids"] = torch.tensor(
            [self._index.get(n, -1) for n in names], dtype=torch.int64
        )
        dataset_dict["vocabulary"] = self.vocabulary
        if self.dataset_name:
            dataset_dict["dataset_name"] = self.dataset_name
        for key in (
            "annotations",
            "pairs",
            "segments_info",
            "pan_seg_file_name",
            "sem_seg_file_name",
        ):
            dataset_dict.pop(key, None)
        return dataset_dict
