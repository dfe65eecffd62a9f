"""Registry of dataset mappers, chosen by ``INPUT.DATASET_MAPPER_NAME``."""

from ov_seg.utils.registry import NamedRegistry, get_registered

DATASET_MAPPER_REGISTRY = NamedRegistry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers: callables that turn a dataset dict into a model input dict.
A registered class is ``@configurable`` with ``from_config(cls, cfg, is_train, dataset_name)``; the
dataset name lets a mapper attach per-dataset fields (e.g. the vocabulary) to each input.
"""


def build_dataset_mapper(cfg, is_train: bool, dataset_name: str = ""):
    """Build the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME`` (``TEST_DATASET_MAPPER_NAME`` at
    test)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if not is_train and cfg.INPUT.TEST_DATASET_MAPPER_NAME:
        name = cfg.INPUT.TEST_DATASET_MAPPER_NAME
    mapper_cls = get_registered(
        DATASET_MAPPER_REGISTRY, name, "dataset mapper (INPUT.DATASET_MAPPER_NAME)"
    )
    return mapper_cls(cfg, is_train=is_train, dataset_name=dataset_name)
