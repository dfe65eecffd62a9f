"""Masked crops for CLIP: K masks of one image -> K CLIP inputs in one vectorised pass.

``prepare_masked_crops`` handles one image; ``prepare_masked_crops_batch`` the masks of a batch of
images in one pass per image size (images stacked, masks concatenated with their image index), with
the same numerics.

Per mask: binarise at ``mask_thr``; empty masks are dropped (``valid`` flag); the box of the mask
(expanded by ``expand_ratio`` around its centre, clipped to the image; or a square box, not clipped)
is resampled to S x S, and pixels whose resampled mask is < 0.5 get the CLIP pixel mean (0 after
normalisation).

Two resamplers compute the same function (``torchvision.ops.roi_align`` with ``aligned=True`` and
adaptive sampling: the mean of bilinear samples on a ceil(box / S) grid per output pixel):

- ``"roi_align"``: one ``roi_align`` call for the image (shared by all boxes) and one for the masks.
  torchvision's CPU kernel is single-threaded and scalar: 100 full-image boxes of a 512 x 683 image
  take ~5 s.
- ``"separable"`` (default): the same sampling, written as two matrices per box, A_y (S, H) and A_x
  (S, W) (bilinear weights averaged over the sampling grid; roi_align's bilinear kernel and its
  out-of-image rules are separable), so a crop is A_y · image · A_xᵀ: batched matmuls (all threads,
  BLAS). Equal to ``"roi_align"`` up to float rounding (|Δ| ~1e-6 after normalisation); a resampled
  mask value that lands within 1e-5 of the 0.5 threshold (an exact tie in exact arithmetic) may
  round to either side.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .builder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

__all__ = [
    "MaskedCrops",
    "BatchMaskedCrops",
    "prepare_masked_crops",
    "prepare_masked_crops_batch",
    "mask_boxes",
    "normalize_clip",
    "resize_center_crop",
    "random_resized_crop",
    "roi_align_matrices",
    "CROP_RESAMPLERS",
]

# Slack of the mask threshold of the separable resampler: roi_align's exact ties (a resampled
# binary mask of exactly 0.5, common on mask edges) stay inside despite the different rounding.
_TIE_EPS = 1e-5


class MaskedCrops(NamedTuple):
    """Output of ``prepare_masked_crops`` (K' = number of valid masks)."""

    images: torch.Tensor  # (K', 3, S, S) normalised CLIP inputs
    masks: torch.Tensor  # (K', S, S) bool crop masks (for mask prompts)
    valid: torch.Tensor  # (K,) bool, False for masks empty after binarisation
    boxes: torch.Tensor  # (K', 4) float crop boxes (x0, y0, x1, y1) in image pixels


class BatchMaskedCrops(NamedTuple):
    """Output of ``prepare_masked_crops_batch`` for B images (N = valid masks of all images; the
    crops of image 0 first, each image's in mask order)."""

    images: torch.Tensor  # (N, 3, S, S) normalised CLIP inputs
    masks: torch.Tensor  # (N, S, S) bool crop masks
    valid: List[torch.Tensor]  # B tensors (K_i,) bool, False for masks empty after binarisation
    boxes: torch.Tensor  # (N, 4) float crop boxes (x0, y0, x1, y1) in their image's pixels
    image_index: torch.Tensor  # (N,) long, image of each crop


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


def random_resized_crop(
    crops: torch.Tensor,
    masks: torch.Tensor,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random-resized crop of every crop, back to its size (the augmentation of OVSeg's CLIP
    training, torchvision's ``RandomResizedCrop`` sampling in one vectorised pass).

    Per crop: an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; a
    side longer than the crop is clamped to it (torchvision re-draws instead); a uniform position.
    Images are resampled bicubically, masks by nearest neighbour.

    Args:
        crops: (N, 3, S, S) normalised crops. masks: (N, S, S) bool crop masks.
        scale: (min, max) area fraction; (1, 1) returns the inputs unchanged.
        ratio: (min, max) width / height.

    Returns:
        crops (N, 3, S, S) and masks (N, S, S) bool.
    """
    n, _, h, w = crops.shape
    if n == 0 or (scale[0] >= 1.0 and scale[1] >= 1.0):
        return crops, masks

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    area = uniform(*scale) * (h * w)
    aspect = uniform(math.log(ratio[0]), math.log(ratio[1])).exp()
    cw = (area * aspect).sqrt().clamp(max=w)
    ch = (area / aspect).sqrt().clamp(max=h)
    x0 = uniform(0.0, 1.0) * (w - cw)
    y0 = uniform(0.0, 1.0) * (h - ch)
    # output pixel (u, v) in [-1, 1] (align_corners=False) -> input x = x0 + (u + 1) / 2 · cw
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(crops), (n, 1, h, w), align_corners=False)
    out = F.grid_sample(crops, grid, mode="bicubic", padding_mode="border", align_corners=False)
    out_masks = F.grid_sample(
        masks[:, None].to(crops.dtype), grid, mode="nearest", align_corners=False
    )[:, 0]
    return out, out_masks > 0.5


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


class _AxisSamples(NamedTuple):
    """roi_align's bilinear samples along one axis, for N boxes, S bins and G samples per bin."""

    low: torch.Tensor  # (N, S·G) long, lower input position of each sample
    high: torch.Tensor  # (N, S·G) long, upper input position
    w_low: torch.Tensor  # (N, S·G) weight of ``low`` (0 for unused / outside samples)
    w_high: torch.Tensor  # (N, S·G) weight of ``high``
    first: torch.Tensor  # (N,) first input position read
    last: torch.Tensor  # (N,) last input position read


def _axis_samples(start: torch.Tensor, end: torch.Tensor, out: int, length: int) -> _AxisSamples:
    """roi_align's sampling along one axis (aligned=True, adaptive sampling ratio).

    Args:
        start, end: (N,) box edges in pixels (x0 / x1 or y0 / y1).
        out: S, output bins. length: the input's size along this axis.
    """
    n = start.shape[0]
    start = start.float() - 0.5
    size = end.float() - 0.5 - start
    bin_size = size / out  # (N,)
    grid = torch.ceil(size / out).clamp_min(1).long()  # samples per bin along this axis
    g_max = int(grid.max()) if n else 1
    g = torch.arange(g_max, device=start.device, dtype=torch.float32)
    p = torch.arange(out, device=start.device, dtype=torch.float32)
    gridf = grid.to(torch.float32)
    # sample positions (N, S, G), in roi_align's order of operations
    pos = (
        start.view(n, 1, 1)
        + p.view(1, out, 1) * bin_size.view(n, 1, 1)
        + (g.view(1, 1, g_max) + 0.5) * bin_size.view(n, 1, 1) / gridf.view(n, 1, 1)
    )
    used = g.view(1, 1, g_max) < gridf.view(n, 1, 1)
    inside = (pos >= -1.0) & (pos <= length) & used
    pos = pos.clamp_min(0.0)
    low = pos.floor().long()
    last = low >= length - 1
    low = torch.where(last, torch.full_like(low, length - 1), low)
    high = torch.where(last, low, low + 1)
    pos = torch.where(last, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    scale = inside.to(pos.dtype) / gridf.view(n, 1, 1)
    first = torch.where(inside, low, length).flatten(1).amin(dim=1).clamp_max(length - 1)
    final = torch.where(inside, high, -1).flatten(1).amax(dim=1).clamp_min(first)
    return _AxisSamples(
        low.view(n, -1),
        high.view(n, -1),
        ((1.0 - frac) * scale).view(n, -1),
        (frac * scale).view(n, -1),
        first,
        final,
    )


def _axis_weights(samples: _AxisSamples, out: int, start: torch.Tensor, size: int) -> torch.Tensor:
    """(n, S, size) weights of the input positions start .. start + size - 1 of each box (the
    samples of the boxes must lie in their window)."""
    n = samples.low.shape[0]
    weights = torch.zeros(n, out, size, device=samples.low.device, dtype=torch.float32)
    flat = weights.view(n, -1)
    base = (torch.arange(out, device=weights.device) * size).repeat_interleave(
        samples.low.shape[1] // out
    )
    # samples outside the window have zero weight (unused or outside the image): clamped
    low = (samples.low - start[:, None]).clamp(0, size - 1)
    high = (samples.high - start[:, None]).clamp(0, size - 1)
    flat.scatter_add_(1, base + low, samples.w_low)
    flat.scatter_add_(1, base + high, samples.w_high)
    return weights


def _select(samples: _AxisSamples, idx: torch.Tensor) -> _AxisSamples:
    return _AxisSamples(*(t[idx] for t in samples))


def roi_align_matrices(
    boxes: torch.Tensor, out_size: Tuple[int, int], image_size: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``roi_align(x, boxes, out_size, 1.0, -1, aligned=True)`` as separable matrices.

    Args:
        boxes: (N, 4) (x0, y0, x1, y1) in pixels. out_size: (S_h, S_w). image_size: (H, W).

    Returns:
        A_y (N, S_h, H) and A_x (N, S_w, W): roi_align of box n on a (C, H, W) map equals
        A_y[n] @ x @ A_x[n]ᵀ per channel.
    """
    zero = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    out = []
    for (i0, i1), s, length in zip(((1, 3), (0, 2)), out_size, image_size):
        samples = _axis_samples(boxes[:, i0], boxes[:, i1], s, length)
        out.append(_axis_weights(samples, s, zero, length))
    return out[0], out[1]


def _resample_roi_align(images, binary, keep, image_index, boxes, size):
    rois = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    crops = roi_align(
        images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    # masks are read in place: roi batch index = mask index
    rois = torch.cat([keep.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    crop_masks = (
        roi_align(
            binary.unsqueeze(1).to(images.dtype),
            rois,
            output_size=size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )[:, 0]
        >= 0.5
    )
    return crops, crop_masks


def _window(samples: _AxisSamples, length: int) -> Tuple[torch.Tensor, int]:
    """One window size for a chunk of boxes: (start (n,), size), each box's window inside [0, L)
    and holding the positions its samples read."""
    size = int((samples.last - samples.first).max()) + 1
    return samples.first.clamp_max(length - size), size


def _separable_chunks(boxes: torch.Tensor, size: Tuple[int, int], image_size, chunk: int):
    """Chunks of boxes of similar size, each box reading only its own window of the input.

    Yields:
        (idx (n,), y0 (n,), x0 (n,), A_y (n, S_h, h), A_xᵀ (n, w, S_w)) per chunk.
    """
    (sh, sw), (height, width) = size, image_size
    sy = _axis_samples(boxes[:, 1], boxes[:, 3], sh, height)
    sx = _axis_samples(boxes[:, 0], boxes[:, 2], sw, width)
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(1) * (boxes[:, 3] - boxes[:, 1]).clamp_min(1)
    order = area.argsort()
    for i in range(0, boxes.shape[0], chunk):
        idx = order[i : i + chunk]
        cy, cx = _select(sy, idx), _select(sx, idx)
        (y0, h), (x0, w) = _window(cy, height), _window(cx, width)
        yield idx, y0, x0, _axis_weights(cy, sh, y0, h), _axis_weights(cx, sw, x0, w).transpose(
            1, 2
        )


def _resample_windows(windows: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """A_y @ x @ A_xᵀ per window and channel: windows (n, C, h, w), A_y (n, S_h, h), A_xᵀ (n, w,
    S_w) -> (n, C, S_h, S_w), contracting the cheaper axis first."""
    n, c, h, w = windows.shape
    sh, sw = ay.shape[1], ax.shape[2]
    if sh * w * (h + sw) <= sw * h * (w + sh):
        # (n, S_h, h) @ (n, h, C w) -> (n, C S_h, w) @ (n, w, S_w) -> (n, S_h, C, S_w)
        t = ay @ windows.transpose(1, 2).reshape(n, h, c * w)
        return (t.view(n, sh * c, w) @ ax).view(n, sh, c, sw).transpose(1, 2)
    # (n, C h, w) @ (n, w, S_w) -> (n, h, C S_w); (n, S_h, h) @ -> (n, S_h, C, S_w)
    t = (windows.reshape(n, c * h, w) @ ax).view(n, c, h, sw).transpose(1, 2)
    return (ay @ t.reshape(n, h, c * sw)).view(n, sh, c, sw).transpose(1, 2)


def _image_chunk(images, which, y0, x0, ay, ax) -> torch.Tensor:
    """(n, 3, S_h, S_w): the windows of ``images[which]`` at (y0, x0) resampled (one chunk)."""
    h, w = ay.shape[2], ax.shape[1]
    # windows by slicing (memcpy); advanced indexing is several times slower on CPU
    starts = torch.stack([y0, x0, which], dim=1).tolist()
    windows = torch.stack([images[b, :, y : y + h, x : x + w] for y, x, b in starts])
    return _resample_windows(windows, ay, ax)


def _mask_chunk(binary, which, y0, x0, ay, ax) -> torch.Tensor:
    """(n, S_h, S_w) bool: the windows of ``binary[which]`` at (y0, x0) resampled, >= 0.5."""
    h, w = ay.shape[2], ax.shape[1]
    starts = torch.stack([y0, x0, which], dim=1).tolist()
    windows = torch.stack([binary[k, y : y + h, x : x + w] for y, x, k in starts])
    resampled = _resample_windows(windows.unsqueeze(1).to(ay.dtype), ay, ax)[:, 0]
    return resampled >= 0.5 - _TIE_EPS


def _resample_separable(images, binary, keep, image_index, boxes, size, chunk: int = 16):
    image_size = tuple(images.shape[-2:])
    # each image is resampled once per distinct box (duplicate proposals of one image share it);
    # without duplicates the image and the mask of a box share one chunk pass (weights built once)
    key = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    shared = unique.shape[0] == boxes.shape[0]
    crops = images.new_empty((unique.shape[0], 3, *size))
    crop_masks = torch.empty((keep.numel(), *size), dtype=torch.bool, device=images.device)
    for idx, y0, x0, ay, ax in _separable_chunks(boxes, size, image_size, chunk):
        crop_masks[idx] = _mask_chunk(binary, keep[idx], y0, x0, ay, ax)
        if shared:
            crops[idx] = _image_chunk(images, image_index[idx], y0, x0, ay, ax)
    if shared:
        return crops, crop_masks
    unique_image = unique[:, 0].long()
    for idx, y0, x0, ay, ax in _separable_chunks(unique[:, 1:], size, image_size, chunk):
        crops[idx] = _image_chunk(images, unique_image[idx], y0, x0, ay, ax)
    return crops[inverse], crop_masks


# name -> fn(images (B, 3, H, W), binary (K, H, W), keep (K',), image_index (K',) of the kept
#   masks, boxes (K', 4), (S_h, S_w)) -> (crops (K', 3, S_h, S_w) 0-255, crop masks (K', S_h, S_w)
#   bool)
CROP_RESAMPLERS = {"roi_align": _resample_roi_align, "separable": _resample_separable}


def _out_size(out_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(out_size, int):
        return int(out_size), int(out_size)
    return tuple(int(s) for s in out_size)


def _check_inputs(image: torch.Tensor, masks: torch.Tensor, resampler: str, name: str = "") -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image{name} must be (3, H, W), got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"masks{name} must be (K, H, W) with the image's H, W; got {tuple(masks.shape)}"
        )
    if resampler not in CROP_RESAMPLERS:
        raise KeyError(f"unknown crop resampler {resampler!r}; known: {sorted(CROP_RESAMPLERS)}")


def _binarize(masks: torch.Tensor, mask_thr: float) -> torch.Tensor:
    return masks if masks.dtype == torch.bool else masks > mask_thr


def _crops_of_stacked(
    images: torch.Tensor,
    binary: torch.Tensor,
    mask_image: torch.Tensor,
    expand_ratio: float,
    size: Tuple[int, int],
    square: bool,
    resampler: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked crops of the masks of B images of one size, in one pass.

    Args:
        images: (B, 3, H, W) float RGB 0-255.
        binary: (K, H, W) bool masks of all images.
        mask_image: (K,) long, the image (index into ``images``) of each mask.

    Returns:
        crops (K', 3, S_h, S_w) normalised, crop masks (K', S_h, S_w) bool, valid (K,) bool,
        boxes (K', 4) and the image index (K',) of the valid masks, in mask order.
    """
    rows = binary.any(dim=2)  # (K, H)
    valid = rows.any(dim=1)
    keep = valid.nonzero()[:, 0]
    if keep.numel() == 0:
        return (
            images.new_zeros((0, 3, *size)),
            torch.zeros((0, *size), dtype=torch.bool, device=images.device),
            valid,
            images.new_zeros((0, 4)),
            mask_image[keep],
        )
    cols = binary.any(dim=1)[keep]  # (K', W)
    boxes = _boxes_from_projections(rows[keep], cols)
    boxes = _expand_boxes(boxes, expand_ratio, square, images.shape[-2:])
    image_index = mask_image[keep]
    crops, crop_masks = CROP_RESAMPLERS[resampler](images, binary, keep, image_index, boxes, size)
    mean = crops.new_tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    std = crops.new_tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    crops = crops.sub_(mean).div_(std).masked_fill_(~crop_masks.unsqueeze(1), 0.0)
    return crops, crop_masks, valid, boxes, image_index


def prepare_masked_crops(
    image: torch.Tensor,
    masks: torch.Tensor,
    mask_thr: float = 0.4,
    expand_ratio: float = 1.0,
    out_size: Union[int, Sequence[int]] = 224,
    square: bool = False,
    resampler: str = "separable",
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
        resampler: ``CROP_RESAMPLERS`` name, "separable" (batched matmuls) or "roi_align" (the
            reference); both compute the same crops (see the module docstring).

    Returns:
        ``MaskedCrops(images (K', 3, S, S), masks (K', S, S) bool, valid (K,), boxes (K', 4))``.

    Raises:
        ValueError: wrong shapes.
        KeyError: unknown resampler.
    """
    _check_inputs(image, masks, resampler)
    binary = _binarize(masks, mask_thr)
    mask_image = torch.zeros(binary.shape[0], dtype=torch.long, device=image.device)
    crops, crop_masks, valid, boxes, _ = _crops_of_stacked(
        image.float().unsqueeze(0),
        binary,
        mask_image,
        expand_ratio,
        _out_size(out_size),
        square,
        resampler,
    )
    return MaskedCrops(crops, crop_masks, valid, boxes)


def prepare_masked_crops_batch(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    mask_thr: float = 0.4,
    expand_ratio: float = 1.0,
    out_size: Union[int, Sequence[int]] = 224,
    square: bool = False,
    resampler: str = "separable",
) -> BatchMaskedCrops:
    """``prepare_masked_crops`` of B images in one pass per image size.

    The images of one size are stacked (b, 3, H, W) and their masks concatenated with their image
    index: boxes of all masks at once, then one set of chunked batched matmuls (or one
    ``roi_align`` call, the image index as roi batch index); duplicate boxes share their crop only
    within an image. Same crops as ``prepare_masked_crops`` image by image.

    Args:
        images: B tensors (3, H_i, W_i), RGB 0-255 (uint8 is converted); all on one device.
        masks: B tensors (K_i, H_i, W_i), soft masks in [0, 1] or bool.
        mask_thr, expand_ratio, out_size, square, resampler: see ``prepare_masked_crops``.

    Returns:
        ``BatchMaskedCrops(images (N, 3, S, S), masks (N, S, S) bool, valid [B x (K_i,)],
        boxes (N, 4), image_index (N,))``: the valid masks of image 0 first.

    Raises:
        ValueError: wrong shapes, or ``images`` and ``masks`` of different lengths.
        KeyError: unknown resampler.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} mask tensors")
    for i, (image, m) in enumerate(zip(images, masks)):
        _check_inputs(image, m, resampler, f" {i}")
    size = _out_size(out_size)
    if len(images) == 0:
        return BatchMaskedCrops(
            torch.zeros((0, 3, *size)),
            torch.zeros((0, *size), dtype=torch.bool),
            [],
            torch.zeros((0, 4)),
            torch.zeros(0, dtype=torch.long),
        )
    device = images[0].device
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    valid: List[torch.Tensor] = [None] * len(images)
    parts = []
    for idx in groups.values():
        counts = [masks[i].shape[0] for i in idx]
        group = torch.tensor(idx, dtype=torch.long, device=device)
        mask_image = torch.repeat_interleave(
            torch.arange(len(idx), device=device), torch.tensor(counts, device=device)
        )
        crops, crop_masks, v, boxes, local = _crops_of_stacked(
            torch.stack([images[i].float() for i in idx]),
            torch.cat([_binarize(masks[i], mask_thr) for i in idx]),
            mask_image,
            expand_ratio,
            size,
            square,
            resampler,
        )
        for i, vi in zip(idx, v.split(counts)):
            valid[i] = vi
        parts.append((crops, crop_masks, boxes, group[local]))
    if len(parts) == 1:
        return BatchMaskedCrops(parts[0][0], parts[0][1], valid, parts[0][2], parts[0][3])
    crops, crop_masks, boxes, image_index = (torch.cat(t) for t in zip(*parts))
    # groups are image-ordered inside: a stable sort by image puts the crops in input order
    order = torch.sort(image_index, stable=True).indices
    return BatchMaskedCrops(
        crops[order], crop_masks[order], valid, boxes[order], image_index[order]
    )
