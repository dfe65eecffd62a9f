"""Masked crops for CLIP: K masks of one image -> K CLIP inputs in one vectorised pass.

Per mask: binarise at ``mask_thr``; empty masks are dropped (``valid`` flag); the box of the mask
(expanded by ``expand_ratio`` around its centre, clipped to the image; or a square box, not clipped)
is resampled to S x S with one ``torchvision.ops.roi_align`` call for the image (shared by all
boxes) and one for the masks; pixels whose resampled mask is < 0.5 get the CLIP pixel mean (0 after
normalisation). No Python loop over masks.
"""

from typing import NamedTuple, Sequence, Tuple, Union

import torch
from torchvision.ops import roi_align

from .builder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

__all__ = [
    "MaskedCrops",
    "prepare_masked_crops",
    "mask_boxes",
    "normalize_clip",
    "resize_center_crop",
]


class MaskedCrops(NamedTuple):
    """Output of ``prepare_masked_crops`` (K' = number of valid masks)."""

    images: torch.Tensor  # (K', 3, S, S) normalised CLIP inputs
    masks: torch.Tensor  # (K', S, S) bool crop masks (for mask prompts)
    valid: torch.Tensor  # (K,) bool, False for masks empty after binarisation
    boxes: torch.Tensor  # (K', 4) float crop boxes (x0, y0, x1, y1) in image pixels


def normalize_clip(images: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) RGB 0-255 -> normalised with ``CLIP_PIXEL_MEAN`` / ``CLIP_PIXEL_STD``."""
    mean = images.new_tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)
    std = images.new_tensor(CLIP_PIXEL_STD).view(3, 1, 1)
    return (images - mean) / std


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) image -> (3, size, size): shortest side resized to ``size`` (bilinear,
    antialiased), then the centre square (CLIP's preprocessing). Returned as float; unchanged values
    when already square at ``size``."""
    image = image.float()
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = torch.nn.functional.interpolate(
        image.unsqueeze(0), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of non-empty binary masks.

    Args:
        masks: (K, H, W) bool, every mask non-empty.

    Returns:
        (K, 4) float (x0, y0, x1, y1): pixel-edge coordinates (x1 = last column + 1).
    """
    return _boxes_from_projections(masks.any(dim=2), masks.any(dim=1))


def _boxes_from_projections(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Boxes from the row (K, H) and column (K, W) occupancy of non-empty masks."""
    h, w = rows.shape[1], cols.shape[1]
    ar_w = torch.arange(w, device=cols.device)
    ar_h = torch.arange(h, device=rows.device)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _expand_boxes(
    boxes: torch.Tensor, ratio: float, square: bool, image_size: Tuple[int, int]
) -> torch.Tensor:
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = (boxes[:, 2] - boxes[:, 0]) * ratio
    h = (boxes[:, 3] - boxes[:, 1]) * ratio
    if square:
        w = h = torch.maximum(w, h)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    if not square:
        height, width = image_size
        out = torch.stack(
            [
                out[:, 0].clamp(0, width),
                out[:, 1].clamp(0, height),
                out[:, 2].clamp(0, width),
                out[:, 3].clamp(0, height),
            ],
            dim=1,
        )
    return out


def prepare_masked_crops(
    image: torch.Tensor,
    masks: torch.Tensor,
    mask_thr: float = 0.4,
    expand_ratio: float = 1.0,
    out_size: Union[int, Sequence[int]] = 224,
    square: bool = False,
) -> MaskedCrops:
    """Masked, resized, normalised CLIP inputs for the K masks of one image.

    Args:
        image: (3, H, W) RGB float in 0-255 (uint8 is converted).
        masks: (K, H, W) soft masks in [0, 1] (binarised with ``> mask_thr``) or bool masks.
        mask_thr: binarisation threshold (OVSeg MASK_THR: 0.4).
        expand_ratio: box side multiplier around the box centre (OVSeg: 1.0 = the tight box).
        out_size: S (CLIP input size), or (S_h, S_w).
        square: use a square box of side max(w, h) (not clipped: outside the image is background) so
            that the crop keeps the mask's aspect ratio; OVSeg resizes the (non-square) box
            (``False``).

    Returns:
        ``MaskedCrops(images (K', 3, S, S), masks (K', S, S) bool, valid (K,), boxes (K', 4))``.

    Raises:
        ValueError: wrong shapes.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks must be (K, H, W) with the image's H, W; got {tuple(masks.shape)}")
    size = (
        (int(out_size), int(out_size))
        if isinstance(out_size, int)
        else tuple(int(s) for s in out_size)
    )
    image = image.float()
    binary = masks if masks.dtype == torch.bool else masks > mask_thr
    rows = binary.any(dim=2)  # (K, H)
    valid = rows.any(dim=1)
    keep = valid.nonzero()[:, 0]
    num = keep.numel()
    if num == 0:
        return MaskedCrops(
            image.new_zeros((0, 3, *size)),
            torch.zeros((0, *size), dtype=torch.bool, device=image.device),
            valid,
            image.new_zeros((0, 4)),
        )
    cols = binary.any(dim=1)[keep]  # (K', W)
    boxes = _boxes_from_projections(rows[keep], cols)
    boxes = _expand_boxes(boxes, expand_ratio, square, image.shape[-2:])
    index = keep.to(boxes.dtype).unsqueeze(
        1
    )  # masks are read in place: roi batch index = mask index
    crops = roi_align(
        image.unsqueeze(0),
        torch.cat([torch.zeros_like(index), boxes], dim=1),
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )
    crop_masks = (
        roi_align(
            binary.unsqueeze(1).to(image.dtype),
            torch.cat([index, boxes], dim=1),
            output_size=size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )[:, 0]
        >= 0.5
    )
    crops = torch.where(crop_masks.unsqueeze(1), normalize_clip(crops), crops.new_zeros(()))
    return MaskedCrops(crops, crop_masks, valid, boxes)
