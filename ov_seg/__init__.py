"""ov_seg: open-vocabulary semantic segmentation on detectron2 (OVSeg, PACL, MGCA, MixReorg).

Importing the package registers its datasets, dataset mappers, evaluators and models.
"""

from . import data, evaluation, modeling  # noqa: F401 (registration)
from .config import add_ov_seg_config

__all__ = ["add_ov_seg_config"]
__version__ = "0.1.0"
