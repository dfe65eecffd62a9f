"""Datasets (registered on import) and dataset mappers."""

from . import dataset_mappers, datasets  # noqa: F401 (registration)
from .dataset_mappers import build_dataset_mapper

__all__ = ["build_dataset_mapper"]
