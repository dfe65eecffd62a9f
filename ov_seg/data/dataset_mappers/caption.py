"""Image-caption mapper (CLIP pre-training and the single-stage models)."""

import copy
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..caption_nouns import build_caption_noun_table
from ..image_io import read_image
from .build import DATASET_MAPPER_REGISTRY

__all__ = ["CaptionDatasetMapper", "build_caption_augmentations", "read_rgb_or_bgr"]


class ResizeShortestEdgeIfNeeded(T.ResizeShortestEdge):
    """detectron2's ``ResizeShortestEdge`` without the resize to the same size."""

    def get_transform(self, image):
        t = super().get_transform(image)
        return T.NoOpTransform() if (t.h, t.w) == (t.new_h, t.new_w) else t


def read_rgb_or_bgr(file_name: str, image_format: str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8: OpenCV for "RGB"/"BGR" (about 3x faster than PIL on small
    PNGs), detectron2's ``read_image`` for other formats or files OpenCV cannot decode.

    Raises:
        UnreadableImageError: a truncated or undecodable file (named), never a silent partial
            decode (``ov_seg.data.image_io.read_image``).
    """
    return read_image(file_name, image_format, fast=True)


def build_caption_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Resize (shortest edge), optional random crop, flip, from ``cfg.INPUT`` (detectron2 rules)."""
    if not is_train:
        return [
            ResizeShortestEdgeIfNeeded(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        ]
    augs = [
        ResizeShortestEdgeIfNeeded(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs


@DATASET_MAPPER_REGISTRY.register("caption")
class CaptionDatasetMapper:
    """Map a caption dataset dict (``file_name``, ``captions``, optional ``hard_negatives``) to a
    model input.

    Output fields: ``image`` (3, H, W) uint8 in ``INPUT.FORMAT`` after augmentation; ``captions``
    (list of str, every caption of the image; the model draws one); ``hard_negatives`` (list of str,
    aligned with ``captions`` when the dataset has one per caption; may be empty);
    ``height``/``width`` of the original image; ``dataset_name`` and ``vocabulary`` (the dataset's
    ``stuff_classes``, if any); in training, when the method reads caption nouns
    (``ov_seg.data.caption_nouns``), ``nouns`` (list of list of str: the noun phrases of each
    caption, aligned with ``captions``, computed with the extractor the method's config asks for).

    Raises (on call):
        KeyError: the dict has no ``captions``. UnreadableImageError: a truncated or undecodable
        image (named; evaluation loops skip it, see ``ov_seg.data.image_io``).
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations,
        image_format: str,
        dataset_name: str = "",
        noun_table: Optional[Callable[[Sequence[str]], List[List[str]]]] = None,
    ):
        """
        Args:
            is_train: training mapper (the ``nouns`` field is only added in training).
            augmentations: detectron2 augmentations of the image.
            image_format: ``INPUT.FORMAT``.
            dataset_name: the dataset mapped (its ``stuff_classes`` become ``vocabulary``).
            noun_table: captions -> the noun phrases of each (an
                ``ov_seg.mining.CaptionNounTable``); None: no ``nouns`` field.
        """
        self.is_train = is_train
        self.noun_table = noun_table if is_train else None
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name) if dataset_name else None
        self.vocabulary = list(meta.get("stuff_classes", []) or []) if meta else []

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        noun_table = build_caption_noun_table(cfg) if is_train else None
        if noun_table is not None:
            # the dataset captions are parsed (or read from the disk cache) here, once, before the
            # loader's worker processes start
            noun_table.load()
        return {
            "is_train": is_train,
            "augmentations": build_caption_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "dataset_name": dataset_name,
            "noun_table": noun_table,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        # a copy of the dict and of its (only) mutable fields: a deepcopy cost 0.1 ms per image
        dataset_dict = {
            k: list(v) if isinstance(v, list) else copy.deepcopy(v)
            for k, v in dataset_dict.items()
            if k != "annotations"
        }
        captions = dataset_dict.get("captions")
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise KeyError(
                f"{dataset_dict.get('file_name', 'dataset dict')}: the 'caption' mapper needs a "
                "non-empty 'captions' list (a caption dataset such as *_captions_* or "
                "register_caption_csv)"
            )
        image = read_rgb_or_bgr(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(
            np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
        )
        dataset_dict["captions"] = list(captions)
        if self.noun_table is not None:
            dataset_dict["nouns"] = self.noun_table(dataset_dict["captions"])
        dataset_dict["hard_negatives"] = list(dataset_dict.get("hard_negatives") or [])
        if self.dataset_name:
            dataset_dict["dataset_name"] = self.dataset_name
            dataset_dict["vocabulary"] = self.vocabulary
        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        return dataset_dict
