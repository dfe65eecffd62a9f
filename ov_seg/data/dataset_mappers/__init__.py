"""Dataset mappers, one per input kind; import registers them."""

from . import panoptic  # noqa: F401 (registration)
from . import caption, detectron2_default, mask_category, semantic  # noqa: F401 (registration)
from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper

__all__ = ["DATASET_MAPPER_REGISTRY", "build_dataset_mapper"]
