"""Per-segment mapper for mask-classification models: one binary mask + class per segment."""

import copy
from typing import List, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ..image_io import read_image
from .build import DATASET_MAPPER_REGISTRY
from .semantic import build_semantic_augmentations, read_sem_seg

__all__ = ["PanopticDatasetMapper", "read_segments", "rgb2id"]

# value of unlabelled pixels in the per-pixel segment index map (uint8)
VOID = 255


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) RGB → segment ids (H, W) int64: R + 256 G + 256² B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def read_segments(dataset_dict: dict, ignore_label: int) -> Tuple[np.ndarray, List[int]]:
    """Segment index map and classes of one image.

    Panoptic annotations (``pan_seg_file_name`` + ``segments_info`` with contiguous
    ``category_id``): one segment per non-crowd segment; crowd and unlabelled pixels are void.
    Otherwise a semantic map (``sem_seg_file_name``): one segment per class present,
    ``ignore_label`` pixels are void.

    Returns:
        (index map (H, W) uint8 with segment index or ``VOID``, class of each segment).

    Raises:
        KeyError: the dict has neither annotation; ValueError: more than 254 segments.
    """
    if "pan_seg_file_name" in dataset_dict:
        pan = rgb2id(read_image(dataset_dict["pan_seg_file_name"], "RGB"))
        segments = [s for s in dataset_dict["segments_info"] if not s.get("iscrowd", 0)]
        ids, classes = [s["id"] for s in segments], [int(s["category_id"]) for s in segments]
        labels = pan
    elif "sem_seg_file_name" in dataset_dict:
        labels = read_sem_seg(dataset_dict["sem_seg_file_name"], ignore_label, ignore_label)
        ids = [int(c) for c in np.unique(labels) if c != ignore_label]
        classes = list(ids)
    else:
        raise KeyError(
            f"{dataset_dict.get('file_name', 'dataset dict')}: the 'panoptic' mapper needs "
            "'pan_seg_file_name' + 'segments_info' or 'sem_seg_file_name'"
        )
    if len(ids) >= VOID:
        raise ValueError(
            f"{dataset_dict.get('file_name')}: {len(ids)} segments; at most {VOID - 1} supported"
        )
    index = np.full(labels.shape, VOID, dtype=np.uint8)
    for j, seg_id in enumerate(ids):
        index[labels == seg_id] = j
    return index, classes


@DATASET_MAPPER_REGISTRY.register("panoptic")
class PanopticDatasetMapper:
    """Map a panoptic (or semantic) dataset dict to a model input with per-segment targets.

    Training output: ``image`` (3, H, W) uint8 in ``INPUT.FORMAT``; ``instances`` with
    ``gt_classes`` (N,) int64 (contiguous category ids) and ``gt_masks`` (``BitMasks`` (N, H, W))
    after augmentation (segments cropped away are dropped; an image without segments gives N = 0);
    ``height``/``width``; ``dataset_name`` and ``vocabulary`` (the dataset's ``stuff_classes``). At
    test time only the image is read (evaluators read the ground truth themselves); the dataset
    dict's other fields are kept.

    Augmentations are the semantic mapper's (resize, crop, flip); the category-area crop constraint
    applies to segments instead of classes.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations,
        image_format: str,
        ignore_label: int,
        dataset_name: str = "",
        train_vocabulary: str = "all",
    ):
        """
        Args:
            is_train: training (read and augment the ground truth) or test (image only).
            augmentations: detectron2 augmentations applied to the image and the segment map.
            image_format: ``INPUT.FORMAT``.
            ignore_label: label of unlabelled pixels in semantic maps (when the dataset has no
                metadata).
            dataset_name: registered dataset name (metadata: ``ignore_label``, ``stuff_classes``).
            train_vocabulary: "all" (the dataset's ``stuff_classes``) or "seen" (training only: the
                vocabulary is the dataset's ``seen_classes``, labels are re-indexed into it and
                segments of other classes are dropped), so that an open-vocabulary head never meets
                unseen names.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name) if dataset_name else None
        self.ignore_label = meta.get("ignore_label", ignore_label) if meta else ignore_label
        self.vocabulary = list(meta.get("stuff_classes", []) or []) if meta else []
        self.label_map = None  # dataset class id -> training label ("seen" vocabulary)
        if train_vocabulary not in ("all", "seen"):
            raise ValueError(f"train_vocabulary must be 'all' or 'seen', got {train_vocabulary!r}")
        if is_train and train_vocabulary == "seen":
            seen = list(meta.get("seen_classes", None) or []) if meta else []
            if not seen:
                raise KeyError(
                    f"dataset {dataset_name!r} has no seen_classes metadata (INPUT.PANOPTIC)"
                )
            self.label_map = {self.vocabulary.index(name): i for i, name in enumerate(seen)}
            self.vocabulary = seen

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "dataset_name": dataset_name,
            "train_vocabulary": cfg.INPUT.PANOPTIC.TRAIN_VOCABULARY,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        index, classes = (
            (None, []) if not self.is_train else read_segments(dataset_dict, self.ignore_label)
        )
        aug_input = T.AugInput(image, sem_seg=index)
        self.augmentations(aug_input)
        image, index = aug_input.image, aug_input.sem_seg
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            if self.label_map is not None:
                classes = [self.label_map.get(c, -1) for c in classes]
            dataset_dict["instances"] = self._instances(index, classes, image.shape[:2])
        if self.dataset_name:
            dataset_dict["dataset_name"] = self.dataset_name
            dataset_dict["vocabulary"] = self.vocabulary
        dataset_dict.pop("annotations", None)
        return dataset_dict

    @staticmethod
    def _instances(index: np.ndarray, classes: List[int], image_shape) -> Instances:
        """Segments with a class >= 0 and at least one pixel as ``Instances``."""
        index = torch.from_numpy(np.array(index, dtype=np.uint8))
        masks, kept = [], []
        for j, c in enumerate(classes):
            m = index == j
            if c >= 0 and m.any():
                masks.append(m)
                kept.append(c)
        inst = Instances(image_shape)
        inst.gt_classes = torch.tensor(kept, dtype=torch.int64)
        inst.gt_masks = BitMasks(
            torch.stack(masks) if masks else torch.zeros((0, *image_shape), dtype=torch.bool)
        )
        return inst
