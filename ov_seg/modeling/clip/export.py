"""Export the CLIP of a trained ``CLIPPretrain`` / ``MaskAdaptedCLIP`` as a standalone checkpoint.

``<OUTPUT_DIR>/clip_export.pth`` holds ``{"state_dict": <plain open_clip state dict>,
"mask_prompts": ...}``; the other models load it with ``MODEL.CLIP.PRETRAINED <path>``
(``build_clip`` + ``load_mask_prompts``).
"""

import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["EXPORT_NAME", "ExportCLIPHook", "export_clip"]

logger = logging.getLogger(__name__)

EXPORT_NAME = "clip_export.pth"


def export_clip(model, path: str) -> str:
    """Call ``model.export_clip(path)`` (unwrapping DDP); returns ``path``.

    Raises:
        TypeError: the model has no ``export_clip`` (only the CLIP training models export).
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not hasattr(model, "export_clip"):
        raise TypeError(
            f"{type(model).__name__} has no export_clip(); use CLIPPretrain or MaskAdaptedCLIP"
        )
    model.export_clip(path)
    logger.info("CLIP exported to %s", path)
    return path


class ExportCLIPHook(HookBase):
    """After training, write ``<OUTPUT_DIR>/clip_export.pth`` for models that have ``export_clip``
    (main process only). Append it in ``Trainer.build_hooks``."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, EXPORT_NAME)

    def after_train(self):
        model = self.trainer.model
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        if comm.is_main_process() and hasattr(inner, "export_clip"):
            export_clip(inner, self.path)
