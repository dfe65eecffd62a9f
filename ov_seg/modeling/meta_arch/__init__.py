"""Meta-architectures (``@META_ARCH_REGISTRY`` classes only)."""

from . import mgca  # noqa: F401 (registration)
from . import mixreorg  # noqa: F401 (registration)
from . import pacl  # noqa: F401 (registration)
from . import proposal_maskformer  # noqa: F401 (registration)
from . import two_stage  # noqa: F401 (registration)
from . import clip_pretrain, mask_adapted_clip  # noqa: F401 (registration)
