"""Dataset registration (on import)."""

from . import register_toyworld  # noqa: F401 (registration)
from . import (  # noqa: F401 (registration)
    register_ade20k_full,
    register_cc3m,
    register_coco,
    register_mined,
    register_pascal_context,
    register_pascal_voc,
)
