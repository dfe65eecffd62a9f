"""A timm Swin Transformer wrapped as a detectron2 ``Backbone`` (the Swin itself is timm's)."""

import logging
import os
from typing import Dict, Optional, Sequence

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

__all__ = ["D2SwinTransformer", "build_swin_backbone"]

logger = logging.getLogger(__name__)

# detectron2 feature names of Swin's four stages (strides 4, 8, 16, 32)
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class D2SwinTransformer(Backbone):
    """timm ``SwinTransformer`` exposing its stage outputs as detectron2 features.

    Each exposed stage output goes through a LayerNorm over channels (as the Swin segmentation
    backbones do) and is returned NCHW. inputs whose size is not a multiple of the patch size are
    zero-padded (right / bottom) and timm pads to the window size, so any input size works; windows
    are always partitioned and shifted (``always_partition``), as in the original Swin for dense
    prediction, also for feature maps smaller than the window.

    Args:
        timm_name: timm Swin model name, e.g. "swin_base_patch4_window12_384".
        img_size: image size the model is built for (relative position tables, checkpoints).
        out_features: subset of ``("res2", "res3", "res4", "res5")``.
        model_kwargs: architecture overrides passed to ``timm.create_model`` (``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``drop_path_rate``).
        pretrained_file: optional local timm checkpoint (loaded with ``weights_only=True``).
    """

    def __init__(
        self,
        timm_name: str,
        img_size: int,
        out_features: Sequence[str] = STAGE_NAMES,
        model_kwargs: Optional[dict] = None,
        pretrained_file: str = "",
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"Swin out_features must be a non-empty subset of {STAGE_NAMES}, got {out_features}"
            )
        self.model = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            strict_img_size=False,
            always_partition=True,
            **(model_kwargs or {}),
        )
        if pretrained_file:
            self._load_timm_checkpoint(pretrained_file)
        self._out_features = list(out_features)
        self._indices = [STAGE_NAMES.index(f) for f in self._out_features]
        self.model.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
        info = self.model.feature_info
        self._out_feature_strides = {
            f: int(info[i]["reduction"]) for f, i in zip(out_features, self._indices)
        }
        self._out_feature_channels = {
            f: int(info[i]["num_chs"]) for f, i in zip(out_features, self._indices)
        }
        self.norms = nn.ModuleDict(
            {f: nn.LayerNorm(self._out_feature_channels[f]) for f in out_features}
        )

    def _load_timm_checkpoint(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Swin checkpoint not found: {path} (MODEL.SWIN.PRETRAINED_FILE)"
            )
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        state = checkpoint_filter_fn(state, self.model)
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head")]
        if missing:
            raise KeyError(
                f"{path}: checkpoint misses Swin weights {missing[:10]} ({len(missing)})"
            )
        logger.info("loaded Swin weights from %s (unused: %s)", path, result.unexpected_keys[:10])

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            {name: (B, C_name, ceil(H / stride), ceil(W / stride))} for each out feature.
        """
        if x.dim() != 4:
            raise ValueError(
                f"D2SwinTransformer takes (B, C, H, W) inputs, got shape {tuple(x.shape)}"
            )
        patch_h, patch_w = self.model.patch_embed.patch_size
        pad_h, pad_w = (-x.shape[-2]) % patch_h, (-x.shape[-1]) % patch_w
        if pad_h or pad_w:  # timm's patch embedding needs multiples of the patch size
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        out = {}
        for name, feat in zip(self._out_features, feats):
            out[name] = self.norms[name](feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def freeze(self, freeze_at: int = 0) -> "D2SwinTransformer":
        """Freeze the patch embedding (``freeze_at`` >= 1) and stages 0 .. ``freeze_at`` - 2,
        following detectron2's ResNet numbering (stem = 1, res2 = 2, ...).

        Returns:
            self
        """
        modules = [self.model.patch_embed] if freeze_at >= 1 else []
        modules += list(self.model.layers[: max(0, freeze_at - 1)])
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
        return self


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> D2SwinTransformer:
    """``D2SwinTransformer`` from ``cfg.MODEL.SWIN`` (BACKBONE.NAME "build_swin_backbone")."""
    c = cfg.MODEL.SWIN
    if input_shape.channels != 3:
        raise ValueError(
            f"Swin takes 3-channel images, got {input_shape.channels} (MODEL.PIXEL_MEAN)"
        )
    overrides = {"drop_path_rate": c.DROP_PATH_RATE}
    if c.EMBED_DIM > 0:
        overrides["embed_dim"] = c.EMBED_DIM
    if c.DEPTHS:
        overrides["depths"] = tuple(c.DEPTHS)
    if c.NUM_HEADS:
        overrides["num_heads"] = tuple(c.NUM_HEADS)
    if c.WINDOW_SIZE > 0:
        overrides["window_size"] = c.WINDOW_SIZE
    backbone = D2SwinTransformer(
        timm_name=c.TIMM_NAME,
        img_size=c.PRETRAIN_IMG_SIZE,
        out_features=c.OUT_FEATURES,
        model_kwargs=overrides,
        pretrained_file=c.PRETRAINED_FILE,
    )
    return backbone.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
