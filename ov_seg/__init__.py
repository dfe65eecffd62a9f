"""ov_seg: open-vocabulary semantic segmentation on detectron2 (OVSeg, PACL, MGCA, MixReorg).

Importing the package registers its datasets, dataset mappers, evaluators and models.
"""

import warnings

# detectron2 0.7 scripts a few helpers with torch.jit.script, deprecated in torch 2.9+: upstream
# noise.
warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning
)

from . import data, evaluation, modeling  # noqa: E402,F401 (registration)
from .config import add_ov_seg_config  # noqa: E402

__all__ = ["add_ov_seg_config"]
__version__ = "0.1.0"
