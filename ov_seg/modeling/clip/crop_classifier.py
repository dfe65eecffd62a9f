"""Classify masks of images with CLIP: masked crops of all images -> one CLIP pass -> cosine logits.

``MaskedCropClassifier`` is what the two-stage model, caption mining and the CLIP training models
use at inference: it joins ``prepare_masked_crops_batch``, the ``MaskPromptVisionEncoder`` and the
``TextClassifier``.
"""

import logging
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .builder import CLIP_PIXEL_MEAN, build_clip_from_cfg, clip_sizes, load_mask_prompts
from .mask_prompt import MaskPromptVisionEncoder
from .masked_crops import prepare_masked_crops_batch
from .text_classifier import TextClassifier
from .tokenizer import build_tokenizer

__all__ = ["MaskedCropClassifier", "jitter_masks"]

logger = logging.getLogger(__name__)

# CROP_BATCH_SIZE 0 (auto): on a CPU, one MLP activation of a crop batch stays within this many
# bytes (ViT-B/16 at 224 px: 8 crops, 377 ms/crop against 541 at 32 and 600 at 100, 1 thread);
# on other devices, this many crops per forward
CPU_ACTIVATION_BUDGET = 20 * 2**20
DEVICE_CROP_BATCH = 256


def jitter_masks(masks: torch.Tensor, max_pixels: int, generator: Optional[torch.Generator] = None):
    """Dilate or erode each mask by a random radius in [-max_pixels, max_pixels] (0 = unchanged).

    Args:
        masks: (K, H, W) bool.
        max_pixels: largest radius r (square structuring element of side 2r + 1).
        generator: optional torch generator for the radii.

    Returns:
        (K, H, W) bool; an erosion that would empty a mask keeps the original mask.
    """
    if max_pixels <= 0 or masks.shape[0] == 0:
        return masks
    m = masks.unsqueeze(1).float()
    variants = [masks]
    for r in range(1, max_pixels + 1):
        k = 2 * r + 1
        variants.append(F.max_pool2d(m, k, stride=1, padding=r)[:, 0] > 0.5)  # dilation
        variants.append(~(F.max_pool2d(1 - m, k, stride=1, padding=r)[:, 0] > 0.5))  # erosion
    stacked = torch.stack(variants)  # (2R + 1, K, H, W)
    choice = torch.randint(len(variants), (masks.shape[0],), generator=generator).to(masks.device)
    out = stacked[choice, torch.arange(masks.shape[0], device=masks.device)]
    empty = ~out.flatten(1).any(dim=1)
    return torch.where(empty.view(-1, 1, 1), masks, out)


class MaskedCropClassifier(nn.Module):
    """Masked-crop CLIP classification of the masks of a batch of images.

    Args:
        clip_model: the open_clip model.
        prompt_depth: mask prompt depth (0 = none).
        prompts: initial / trained prompts (depth, grid², width) or None (random init when depth >
            0).
        templates: prompt template set of the text classifier.
        mask_thr, expand_ratio, square_crop: see ``prepare_masked_crops``.
        logit_scale: fixed scale of the cosine logits (OVSeg: 100).
        register_clip: register ``clip_model`` as the submodule ``clip`` (default); ``False`` for a
            parent that owns the CLIP already (then the state dict holds only the prompts).
        batch_size: crops per CLIP forward at inference (0 = auto, see ``crop_batch_size``).
        model_name: the open_clip name (picks the tokenizer of non-BPE text towers; "" = BPE).
        text_cache_dir: on-disk cache of class-name embeddings ("" = none; see
            ``TextEmbeddingCache``).
        resampler: crop resampler of ``prepare_masked_crops`` ("separable"; "roi_align" is the
            reference).
    """

    # RGB 0-255 mean of CLIP's normalisation: the value masked-out pixels of a crop take
    pixel_mean: Tuple[float, float, float] = CLIP_PIXEL_MEAN

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        prompt_depth: int = 0,
        prompts: Optional[torch.Tensor] = None,
        templates: Union[str, Sequence[str]] = "vild",
        mask_thr: float = 0.4,
        expand_ratio: float = 1.0,
        square_crop: bool = False,
        logit_scale: float = 100.0,
        register_clip: bool = True,
        batch_size: int = 0,
        model_name: str = "",
        text_cache_dir: str = "",
        resampler: str = "separable",
    ):
        super().__init__()
        if register_clip:
            self.clip = clip_model
        else:
            object.__setattr__(self, "clip", clip_model)
        self._owns_clip = bool(register_clip)
        self.encoder = MaskPromptVisionEncoder(
            clip_model.visual, prompt_depth, prompts=prompts, register_visual=False
        )
        self.text_classifier = TextClassifier(
            clip_model,
            templates=templates,
            tokenizer=build_tokenizer(clip_model, model_name),
            cache_dir=text_cache_dir,
        )
        self.crop_size = clip_sizes(clip_model).image_size
        self.mask_thr = float(mask_thr)
        self.expand_ratio = float(expand_ratio)
        self.square_crop = bool(square_crop)
        self.logit_scale = float(logit_scale)
        self.batch_size = int(batch_size)
        self.resampler = resampler

    @classmethod
    def from_config(cls, cfg, clip_model: Optional[nn.Module] = None, train_prompts: bool = False):
        """From ``cfg.MODEL.CLIP``; builds the CLIP when ``clip_model`` is None.

        Prompts come from the checkpoint ``MODEL.CLIP.PRETRAINED`` when it holds some. Without
        stored prompts, ``train_prompts=True`` initialises them randomly (mask prompt tuning);
        otherwise the depth falls back to 0, since untrained prompts would only corrupt the crops'
        embeddings.
        """
        ccfg = cfg.MODEL.CLIP
        if clip_model is None:
            clip_model = build_clip_from_cfg(cfg)
        prompts = load_mask_prompts(ccfg.PRETRAINED)
        depth = ccfg.MASK_PROMPT_DEPTH
        if depth > 0 and prompts is None and not train_prompts:
            logger.warning(
                "MODEL.CLIP.PRETRAINED %r holds no mask prompts: MASK_PROMPT_DEPTH %d ignored "
                "(depth 0)",
                ccfg.PRETRAINED,
                depth,
            )
            depth = 0
        if prompts is not None and depth > 0 and prompts.shape[0] != depth:
            raise ValueError(
                f"MODEL.CLIP.PRETRAINED holds mask prompts of depth {prompts.shape[0]}, "
                f"but MODEL.CLIP.MASK_PROMPT_DEPTH is {depth}"
            )
        return {
            "clip_model": clip_model,
            "prompt_depth": depth,
            "prompts": prompts if depth > 0 else None,
            "templates": ccfg.TEMPLATES,
            "mask_thr": ccfg.MASK_THR,
            "expand_ratio": ccfg.MASK_EXPAND_RATIO,
            "square_crop": ccfg.MASK_SQUARE_CROP,
            "logit_scale": ccfg.LOGIT_SCALE,
            "model_name": ccfg.MODEL_NAME,
            "text_cache_dir": ccfg.TEXT_CACHE_DIR,
            "batch_size": ccfg.CROP_BATCH_SIZE,
        }

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if not self._owns_clip:
            self.clip._apply(fn, *args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def check_crop_size(self, size: int, key: str) -> int:
        """``size`` as an int if it can be a crop side (a positive multiple of the patch size: the
        positional embedding and the mask prompts are interpolated to its grid).

        Raises:
            ValueError: naming the config ``key`` it came from.
        """
        patch = self.encoder.patch_size
        if size < patch[0] or size % patch[0] or size % patch[1]:
            raise ValueError(f"{key}: {size} is not a multiple of the CLIP patch size {patch}")
        return int(size)

    def crop(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        size: Optional[int] = None,
        mask_thr: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Masked crops of every image in one batched pass (see ``prepare_masked_crops_batch``).

        Args:
            images: B tensors (3, H_i, W_i), RGB 0-255.
            masks: B tensors (K_i, H_i, W_i), soft or bool.
            size: crop side S (a ``check_crop_size`` value); None = ``crop_size``.
            mask_thr: binarisation threshold of soft masks; None = ``mask_thr``.

        Returns:
            crops (N, 3, S, S), crop masks (N, S, S) bool, and B valid flags (K_i,) (N = valid
            masks, image 0's first).
        """
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} mask tensors")
        device = self.device
        out = prepare_masked_crops_batch(
            [img.to(device) for img in images],
            [m.to(device) for m in masks],
            self.mask_thr if mask_thr is None else float(mask_thr),
            self.expand_ratio,
            self.crop_size if size is None else size,
            self.square_crop,
            self.resampler,
        )
        if not images:  # no image to take the device from
            return out.images.to(device), out.masks.to(device), out.valid
        return out.images, out.masks, out.valid

    def encode_crops(self, crops: torch.Tensor, crop_masks: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, 3, S, S) normalised crops (+ (N, S, S) masks for prompts) -> (N, D) normalised."""
        if crops.shape[0] == 0:
            return crops.new_zeros((0, self.encoder.embed_dim))
        out = []
        step = self.crop_batch_size(crops) if not torch.is_grad_enabled() else crops.shape[0]
        for i in range(0, crops.shape[0], step):
            m = None if crop_masks is None else crop_masks[i : i + step]
            out.append(self.encoder(crops[i : i + step], m, need_tokens=False).embedding)
        return F.normalize(torch.cat(out), dim=-1)

    def crop_batch_size(self, crops: torch.Tensor) -> int:
        """Crops per image-tower forward at inference for (N, 3, S, S) ``crops``: the configured
        size, or (0 = auto) on a CPU as many as keep one MLP activation (tokens × MLP width) of
        the batch within ``CPU_ACTIVATION_BUDGET`` bytes, elsewhere ``DEVICE_CROP_BATCH``."""
        if self.batch_size > 0:
            return self.batch_size
        if crops.device.type != "cpu":
            return DEVICE_CROP_BATCH
        visual = self.encoder.visual
        patch = clip_sizes(self.clip).patch_size
        tokens = (crops.shape[-2] // patch) * (crops.shape[-1] // patch) + 1
        fc = getattr(getattr(visual.transformer.resblocks[0], "mlp", None), "c_fc", None)
        hidden = int(getattr(fc, "out_features", 4 * visual.conv1.out_channels))
        return max(1, CPU_ACTIVATION_BUDGET // (tokens * hidden * crops.element_size()))

    def embed(
        self, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Normalised embeddings (N, D) of the valid masks of all images, and the B valid flags."""
        crops, crop_masks, valid = self.crop(images, masks)
        return self.encode_crops(crops, crop_masks), valid

    def forward(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        vocabulary: Sequence[str],
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """CLIP logits of each mask against ``vocabulary``.

        Returns:
            B logits (K_i, C) = logit_scale * cos(crop, class name) (rows of empty masks are 0, i.e.
            a uniform softmax), and the B valid flags (K_i,).
        """
        emb, valid = self.embed(images, masks)
        text = self.text_classifier(vocabulary).to(emb.dtype)
        logits = self.logit_scale * emb @ text.t()
        out, start = [], 0
        for v in valid:
            full = logits.new_zeros((v.shape[0], text.shape[0]))
            n = int(v.sum())
            full[v] = logits[start : start + n]
            start += n
            out.append(full)
        return out, valid

    @torch.no_grad()
    def classify_inputs(self, batched_inputs: Sequence[dict]) -> List[dict]:
        """Eval-mode outputs of the CLIP training models on ``mask_category`` mapper inputs.

        Args:
            batched_inputs: dicts with ``image`` (3, H, W) uint8, ``masks`` (K, H, W),
                ``vocabulary`` (C names) and ``category_ids`` (K,).

        Returns:
            per input ``{"mask_cls": {"logits": (K, C), "labels": (K,), "valid": (K,)}}`` (for the
            ``mask_classification`` evaluator).
        """
        out: List[dict] = [{} for _ in batched_inputs]
        groups = {}
        for i, x in enumerate(batched_inputs):
            for key in ("image", "masks", "vocabulary"):
                if key not in x:
                    raise KeyError(
                        f"eval input {i} has no {key!r}: evaluate CLIP models on a segmentation "
                        "dataset with INPUT.TEST_DATASET_MAPPER_NAME mask_category"
                    )
            groups.setdefault(tuple(x["vocabulary"]), []).append(i)
        for vocabulary, idx in groups.items():
            logits, valid = self(
                [batched_inputs[i]["image"] for i in idx],
                [batched_inputs[i]["masks"] for i in idx],
                vocabulary,
            )
            for i, lo, v in zip(idx, logits, valid):
                labels = batched_inputs[i].get("category_ids")
                if labels is None:
                    labels = torch.full((lo.shape[0],), -1, dtype=torch.long)
                out[i]["mask_cls"] = {"logits": lo, "labels": labels, "valid": v}
        return out
