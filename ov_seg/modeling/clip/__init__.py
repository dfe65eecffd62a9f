"""CLIP core: open_clip models (+ tiny project configs), mask prompt tuning, text classifier, masked
crops.

Everything wraps the ``open_clip`` package; nothing here copies CLIP.
"""

from .builder import (
    ACTIVATIONS,
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_STD,
    CLIPSizes,
    ResolvedCLIPConfig,
    build_clip,
    build_clip_from_cfg,
    clip_activation,
    clip_sizes,
    load_clip_checkpoint,
    load_clip_state_dict,
    load_mask_prompts,
    resolve_clip_config,
    save_clip_checkpoint,
)
from .crop_classifier import MaskedCropClassifier, jitter_masks
from .mask_prompt import (
    MaskPromptVisionEncoder,
    VisionOutput,
    interpolate_grid_embedding,
    patch_keep_mask,
)
from .masked_crops import (
    BatchMaskedCrops,
    MaskedCrops,
    mask_boxes,
    normalize_clip,
    prepare_masked_crops,
    prepare_masked_crops_batch,
    random_resized_crop,
    resize_center_crop,
)
from .text_classifier import TEMPLATE_SETS, TextClassifier, resolve_templates
from .tokenizer import (
    CLIPTokenizer,
    CompactTokenEmbedding,
    build_tokenizer,
    install_compact_vocabulary,
)

__all__ = [
    "CLIP_PIXEL_MEAN",
    "CLIP_PIXEL_STD",
    "ACTIVATIONS",
    "CLIPSizes",
    "ResolvedCLIPConfig",
    "build_clip",
    "build_clip_from_cfg",
    "clip_activation",
    "clip_sizes",
    "load_clip_checkpoint",
    "load_mask_prompts",
    "load_clip_state_dict",
    "resolve_clip_config",
    "save_clip_checkpoint",
    "MaskedCropClassifier",
    "jitter_masks",
    "MaskPromptVisionEncoder",
    "VisionOutput",
    "interpolate_grid_embedding",
    "patch_keep_mask",
    "BatchMaskedCrops",
    "MaskedCrops",
    "mask_boxes",
    "normalize_clip",
    "prepare_masked_crops",
    "prepare_masked_crops_batch",
    "random_resized_crop",
    "resize_center_crop",
    "TEMPLATE_SETS",
    "TextClassifier",
    "resolve_templates",
    "CLIPTokenizer",
    "CompactTokenEmbedding",
    "build_tokenizer",
    "install_compact_vocabulary",
]
