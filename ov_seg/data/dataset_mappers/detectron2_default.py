"""detectron2's own ``DatasetMapper`` under the name "detectron2"."""

from detectron2.data import DatasetMapper

from .build import DATASET_MAPPER_REGISTRY


@DATASET_MAPPER_REGISTRY.register("detectron2")
def detectron2_dataset_mapper(cfg, is_train: bool, dataset_name: str = ""):
    """detectron2's ``DatasetMapper(cfg, is_train)``; ``dataset_name`` is unused."""
    return DatasetMapper(cfg, is_train=is_train)
