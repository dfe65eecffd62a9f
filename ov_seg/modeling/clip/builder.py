"""Build open_clip models from a name + an open_clip pretrained tag or a local checkpoint file.

The project ships tiny model configs (``model_configs/*.json``, registered with open_clip's config
mechanism on import) for the toy world and the tests: ``ovseg-tiny-vit8-64`` (64 px, patch 8) and
``ovseg-tiny-vit8-128``.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import open_clip
import torch

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__all__ = [
    "build_clip",
    "load_clip_state_dict",
    "load_clip_checkpoint",
    "load_mask_prompts",
    "save_clip_checkpoint",
    "clip_sizes",
    "CLIPSizes",
    "MODEL_CONFIG_DIR",
    "CLIP_PIXEL_MEAN",
    "CLIP_PIXEL_STD",
]

# The CLIP pixel statistics (OpenAI CLIP's, RGB, 0-255 scale): the one normalisation of every CLIP
# input in the project, and the fill value of the background of masked crops.
# (122.77, 116.75, 104.09) and (68.50, 66.63, 70.32)
CLIP_PIXEL_MEAN = tuple(255.0 * m for m in open_clip.OPENAI_DATASET_MEAN)
CLIP_PIXEL_STD = tuple(255.0 * s for s in open_clip.OPENAI_DATASET_STD)


@dataclass(frozen=True)
class CLIPSizes:
    """Sizes read from a built model (never from its name)."""

    embed_dim: int  # joint image-text embedding dim D
    vision_width: int  # transformer width d_v of the image tower
    vision_layers: int
    patch_size: int
    image_size: int  # input resolution (square)
    grid_size: int  # patches per side
    text_width: int
    context_length: int


def clip_sizes(model: torch.nn.Module) -> CLIPSizes:
    """Read the sizes of an open_clip ``CLIP`` model with a ``VisionTransformer`` image tower."""
    visual = model.visual
    grid = visual.grid_size
    patch = visual.patch_size
    image_size = visual.image_size
    return CLIPSizes(
        embed_dim=(
            int(model.text_projection.shape[1])
            if isinstance(model.text_projection, torch.Tensor)
            else int(model.text_projection.out_features)
        ),
        vision_width=int(visual.conv1.out_channels),
        vision_layers=len(visual.transformer.resblocks),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        image_size=int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size),
        grid_size=int(grid[0] if isinstance(grid, (tuple, list)) else grid),
        text_width=int(model.token_embedding.weight.shape[1]),
        context_length=int(model.context_length),
    )


def _extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint is not a state dict (or a dict with 'state_dict' / 'model')")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_clip_checkpoint(path: str) -> Dict[str, Any]:
    """Read a local CLIP checkpoint with ``torch.load(weights_only=True)``.

    Returns:
        the raw loaded object (a dict): a state dict, or ``{"state_dict": ..., "mask_prompts": ...,
        ...}`` as ``save_clip_checkpoint`` writes it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_mask_prompts(pretrained: Optional[str]) -> Optional[torch.Tensor]:
    """The mask prompts (depth, grid², width) stored in an exported checkpoint, or None (open_clip
    tags, "" and checkpoints without prompts)."""
    if not pretrained or not os.path.isfile(pretrained):
        return None
    obj = load_clip_checkpoint(pretrained)
    prompts = obj.get("mask_prompts") if isinstance(obj, dict) else None
    return prompts if isinstance(prompts, torch.Tensor) else None


def save_clip_checkpoint(
    path: str,
    model: torch.nn.Module,
    mask_prompts: Optional[torch.Tensor] = None,
    meta: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``{"state_dict": <plain open_clip state dict>, "mask_prompts": (depth, grid², width) or
    absent, "meta": {...}}`` atomically (temporary file + rename). ``build_clip(name, path)`` loads
    it.
    """
    obj: Dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    }
    if mask_prompts is not None:
        obj["mask_prompts"] = mask_prompts.detach().cpu().contiguous()
    if meta:
        obj["meta"] = dict(meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_clip_state_dict(model: torch.nn.Module, path: str, strict_shapes: bool = True) -> None:
    """Load a local checkpoint (raw state dict, ``{"state_dict": ...}`` or ``{"model": ...}``;
    ``module.`` prefixes removed) into ``model`` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError: keys do not match; the message names the missing and unexpected keys.
        ValueError: a tensor has the wrong shape.
    """
    sd = _extract_state_dict(load_clip_checkpoint(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {path} does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)}); unexpected keys "
            f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    bad = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape
    ]
    if bad and strict_shapes:
        raise ValueError(f"checkpoint {path}: shape mismatch (key, checkpoint, model): {bad[:10]}")
    model.load_state_dict(sd, strict=True)


def build_clip(model_name: str, pretrained: Optional[str] = None, device="cpu") -> torch.nn.Module:
    """Create an open_clip model.

    Args:
        model_name: any ``open_clip.list_models()`` name (including the project's tiny configs).
        pretrained: ``None``/"" (random init), an open_clip pretrained tag (e.g. "openai", needs
            network access or a populated cache) or a local checkpoint file.

    Returns:
        the open_clip ``CLIP`` model (eval mode), on ``device``.
    """
    if model_name not in open_clip.list_models():
        raise KeyError(
            f"unknown CLIP model {model_name!r}; see open_clip.list_models() "
            f"(tiny project configs: {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))})"
        )
    local = bool(pretrained) and (os.path.sep in pretrained or os.path.isfile(pretrained))
    model = open_clip.create_model(
        model_name, pretrained=None if (local or not pretrained) else pretrained, device=device
    )
    if local:
        load_clip_state_dict(model, pretrained)
    return model.eval()
