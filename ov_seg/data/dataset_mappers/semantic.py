"""Semantic-segmentation mapper (PNG or 16-bit TIFF ground truth)."""

import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..image_io import read_image
from .build import DATASET_MAPPER_REGISTRY

__all__ = ["SemanticDatasetMapper", "build_semantic_augmentations", "read_sem_seg"]


def build_semantic_augmentations(cfg, is_train: bool):
    """Resize / crop / flip augmentations from ``cfg.INPUT`` (detectron2 semantics)."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(T.RandomBrightness(0.8, 1.2))
        augs.append(T.RandomContrast(0.8, 1.2))
        augs.append(T.RandomSaturation(0.8, 1.2))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs


def read_sem_seg(file_name: str, ignore_label: int, ignore_value: int) -> np.ndarray:
    """Read a label map (8-bit PNG or 16-bit PNG/TIFF) as int64 (H, W), ``ignore_label`` →
    ``ignore_value``.

    Raises:
        ValueError: when the file is not a single-channel label image.
    """
    gt = read_image(file_name)
    if gt.ndim != 2:
        raise ValueError(f"{file_name}: expected a single-channel label map, got shape {gt.shape}")
    gt = gt.astype(np.int64)
    if ignore_label != ignore_value:
        gt[gt == ignore_label] = ignore_value
    return gt


@DATASET_MAPPER_REGISTRY.register("semantic")
class SemanticDatasetMapper:
    """Map a semantic-segmentation dataset dict to a model input.

    Output fields: ``image`` (3, H, W) uint8 in ``INPUT.FORMAT``; ``sem_seg`` (H, W) int64 with
    ignore = ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``; ``height``/``width`` of the original image;
    ``dataset_name``; ``vocabulary`` (the dataset's ``stuff_classes``) when the dataset has
    metadata.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations,
        image_format: str,
        ignore_value: int,
        dataset_name: str = "",
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_value = ignore_value
        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name) if dataset_name else None
        self.ignore_label = getattr(meta, "ignore_label", ignore_value) if meta else ignore_value
        self.vocabulary = list(getattr(meta, "stuff_classes", []) or []) if meta else []
        if self.ignore_label != ignore_value and len(self.vocabulary) > ignore_value:
            raise ValueError(
                f"dataset {dataset_name!r} has {len(self.vocabulary)} classes, so its ignore label "
                f"{self.ignore_label} cannot be remapped to MODEL.SEM_SEG_HEAD.IGNORE_VALUE "
                f"{ignore_value} (a valid class id); set MODEL.SEM_SEG_HEAD.IGNORE_VALUE "
                f"{self.ignore_label}"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "dataset_name": dataset_name,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = read_sem_seg(
                dataset_dict.pop("sem_seg_file_name"), self.ignore_label, self.ignore_value
            )
        if sem_seg is not None:
            # detectron2 resizes uint8 maps with PIL and others with torch (no integer support):
            # exact for labels < 2**24 either way
            sem_seg = sem_seg.astype(np.uint8 if sem_seg.max(initial=0) <= 255 else np.float32)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        if self.dataset_name:
            dataset_dict["dataset_name"] = self.dataset_name
            dataset_dict["vocabulary"] = self.vocabulary
        dataset_dict.pop("annotations", None)
        return dataset_dict
