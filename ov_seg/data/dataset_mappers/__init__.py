"""Dataset mappers, one per input kind; import registers them."""

from . import detectron2_default, semantic  # noqa: F401 (registration)
from . import panoptic  # noqa: F401 (registration)
from . import caption, mask_category  # noqa: F401 (registration)
from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper

__all__ = ["DATASET_MAPPER_REGISTRY", "build_dataset_mapper"]
