"""Build open_clip models from a name + an open_clip pretrained tag or a local checkpoint file.

The project ships tiny model configs (``model_configs/*.json``, registered with open_clip's config
mechanism on import) for the toy world and the tests: ``ovseg-tiny-vit8-64`` (64 px, patch 8) and
``ovseg-tiny-vit8-128``.

Activation (``MODEL.CLIP.ACTIVATION``): OpenAI's CLIP weights were trained with QuickGELU
(x · σ(1.702 x)), while open_clip's plain model names (``ViT-B-16``, ``ViT-L-14``) build GELU.
Loading ``openai`` weights into a GELU model runs without any error and gives wrong embeddings, so
``resolve_clip_config`` picks the activation before the model is built: "auto" takes it from
open_clip's record of the pretrained tag (``quick_gelu`` of ``open_clip.get_pretrained_cfg``), from
the ``meta`` of a checkpoint written by ``save_clip_checkpoint``, else from the model config.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import open_clip
import torch
from open_clip.transformer import QuickGELU

from ov_seg.checkpoint import safe_torch_load

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__all__ = [
    "ACTIVATIONS",
    "ResolvedCLIPConfig",
    "build_clip",
    "build_clip_from_cfg",
    "clip_activation",
    "resolve_clip_config",
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
    """Read a local CLIP checkpoint with ``ov_seg.checkpoint.safe_torch_load`` (weights only).

    Returns:
        the raw loaded object (a dict): a state dict, or ``{"state_dict": ..., "mask_prompts": ...,
        ...}`` as ``save_clip_checkpoint`` writes it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    return safe_torch_load(path)


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
    it. ``meta["activation"]`` records the model's activation (``clip_activation``), which
    ``build_clip`` reads back with ``activation="auto"``.
    """
    obj: Dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    }
    if mask_prompts is not None:
        obj["mask_prompts"] = mask_prompts.detach().cpu().contiguous()
    obj["meta"] = {**(meta or {}), "activation": clip_activation(model)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_clip_state_dict(
    model: torch.nn.Module, path: str, strict_shapes: bool = True, checkpoint: Any = None
) -> None:
    """Load a local checkpoint (raw state dict, ``{"state_dict": ...}`` or ``{"model": ...}``;
    ``module.`` prefixes removed) into ``model``, read with ``load_clip_checkpoint`` unless the
    loaded ``checkpoint`` object is given.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError: keys do not match; the message names the missing and unexpected keys.
        ValueError: a tensor has the wrong shape.
    """
    sd = _extract_state_dict(load_clip_checkpoint(path) if checkpoint is None else checkpoint)
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


# MODEL.CLIP.ACTIVATION values
ACTIVATIONS = ("auto", "quick_gelu", "gelu")


@dataclass(frozen=True)
class ResolvedCLIPConfig:
    """What ``build_clip`` builds, decided without building or downloading anything."""

    model_name: str
    quick_gelu: bool  # the MLP activation of both towers: QuickGELU (True) or GELU
    source: str  # why: "MODEL.CLIP.ACTIVATION", "pretrained tag", "checkpoint meta", "model config"
    pretrained_tag: Optional[str]  # an open_clip pretrained tag, or None
    checkpoint_path: Optional[str]  # a local checkpoint file, or None

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"


def clip_activation(model: torch.nn.Module) -> str:
    """ "quick_gelu" when the open_clip model uses QuickGELU anywhere, else "gelu"."""
    return "quick_gelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"


def _is_local(pretrained: Optional[str]) -> bool:
    return bool(pretrained) and (os.path.sep in pretrained or os.path.isfile(pretrained))


def resolve_clip_config(
    model_name: str,
    pretrained: Optional[str] = None,
    activation: str = "auto",
    checkpoint: Any = None,
) -> ResolvedCLIPConfig:
    """Decide the model config ``build_clip`` uses; nothing is downloaded.

    Args:
        model_name: an ``open_clip.list_models()`` name.
        pretrained: None / "" (random init), an open_clip pretrained tag or a local checkpoint.
        activation: "quick_gelu" or "gelu" (forced), or "auto": the pretrained tag's record in
            open_clip (``quick_gelu`` of ``open_clip.get_pretrained_cfg``: True for ``openai``), a
            local checkpoint's ``meta["activation"]`` (``save_clip_checkpoint``), else the model
            config's default (False for the plain names such as ``ViT-L-14``).
        checkpoint: the already loaded local checkpoint (avoids reading ``pretrained`` twice).

    Raises:
        KeyError: unknown model name. ValueError: unknown activation, or a pretrained value that
            is neither a file nor a tag open_clip knows for ``model_name``.
        FileNotFoundError: a local checkpoint path that does not exist.
    """
    if model_name not in open_clip.list_models():
        raise KeyError(
            f"unknown CLIP model {model_name!r}; see open_clip.list_models() "
            f"(tiny project configs: {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))})"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"MODEL.CLIP.ACTIVATION must be one of {ACTIVATIONS}, got {activation!r}")
    default = bool(open_clip.get_model_config(model_name).get("quick_gelu", False))
    tag = path = None
    recorded, source = None, "model config"
    if _is_local(pretrained):
        path = pretrained
        if activation == "auto":
            obj = load_clip_checkpoint(path) if checkpoint is None else checkpoint
            meta = obj.get("meta") if isinstance(obj, dict) else None
            value = meta.get("activation") if isinstance(meta, dict) else None
            if value is not None:
                recorded, source = value == "quick_gelu", "checkpoint meta"
            else:
                logger.warning(
                    "CLIP checkpoint %s records no activation: using %s's default (%s); set "
                    "MODEL.CLIP.ACTIVATION quick_gelu if it was trained from OpenAI weights",
                    path,
                    model_name,
                    "QuickGELU" if default else "GELU",
                )
    elif pretrained:
        tag = pretrained
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if not tag_cfg:
            raise ValueError(
                f"MODEL.CLIP.PRETRAINED {tag!r} is neither a file nor an open_clip tag of "
                f"{model_name} (tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
            )
        recorded, source = bool(tag_cfg.get("quick_gelu", default)), "pretrained tag"
    if activation != "auto":
        quick, source = activation == "quick_gelu", "MODEL.CLIP.ACTIVATION"
    else:
        quick = default if recorded is None else recorded
    return ResolvedCLIPConfig(model_name, quick, source, tag, path)


def build_clip(
    model_name: str,
    pretrained: Optional[str] = None,
    device="cpu",
    activation: str = "auto",
) -> torch.nn.Module:
    """Create an open_clip model with the activation of ``resolve_clip_config``.

    Args:
        model_name: any ``open_clip.list_models()`` name (including the project's tiny configs).
        pretrained: ``None``/"" (random init), an open_clip pretrained tag (e.g. "openai", needs
            network access or a populated cache) or a local checkpoint file.
        activation: ``MODEL.CLIP.ACTIVATION``: "auto", "quick_gelu" or "gelu".

    Returns:
        the open_clip ``CLIP`` model (eval mode), on ``device``.
    """
    checkpoint = load_clip_checkpoint(pretrained) if _is_local(pretrained) else None
    resolved = resolve_clip_config(model_name, pretrained, activation, checkpoint=checkpoint)
    default = bool(open_clip.get_model_config(model_name).get("quick_gelu", False))
    kwargs: Dict[str, Any] = {}
    if resolved.quick_gelu and not default:
        kwargs["force_quick_gelu"] = True
    elif default and not resolved.quick_gelu:
        kwargs["quick_gelu"] = False  # a model kwarg: overrides the config's QuickGELU
    logger.info("CLIP %s: %s (from the %s)", model_name, resolved.activation, resolved.source)
    quiet = _NotRandomInit()
    if checkpoint is not None:  # the file's weights follow
        logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(
            model_name, pretrained=resolved.pretrained_tag, device=device, **kwargs
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    if checkpoint is not None:
        load_clip_state_dict(model, pretrained, checkpoint=checkpoint)
    return model.eval()


class _NotRandomInit(logging.Filter):
    """Drops open_clip's "Model initialized randomly" warning when a local checkpoint is loaded
    next (it printed on every correct run, so nobody read it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def build_clip_from_cfg(cfg, activation: Optional[str] = None) -> torch.nn.Module:
    """``build_clip`` of ``MODEL.CLIP`` (MODEL_NAME, PRETRAINED, ACTIVATION unless ``activation``
    is given): the one way models build their CLIP from a config."""
    ccfg = cfg.MODEL.CLIP
    return build_clip(
        ccfg.MODEL_NAME, ccfg.PRETRAINED or None, activation=activation or ccfg.ACTIVATION
    )
