"""Where a CLIP's recognition lives: the attribute probe (``mask_classification``) of several ways
to read a ground-truth region of a scene out of one CLIP.

Each readout turns every ground-truth class region of the dataset's images into scores over the
vocabulary (cosines to the template-ensembled class embeddings):

* ``masked crop xR``: the region's box (× R) cut out, grey outside the mask, resized to the CLIP's
  input size (the two-stage model's crops at R = 1); ``square`` crops keep the aspect ratio;
* ``unmasked crop x1``: the same tight box with the scene's pixels kept (the object in context);
* ``masked scene, S px``: the whole image at S px with everything outside the region grey (the
  object at its scene scale), read as the mean of the projected patch tokens (the image embedding
  of an average-pooled tower such as the toy CLIP's; for a class-token tower, a token average);
* ``dense tokens, S px`` / ``dense tokens (value path), S px``: the image at S px through the image
  tower once, its projected patch tokens averaged over the region (what a dense single-stage model
  starts from; the value path is MaskCLIP's last block, as MGCA's encoder runs it).

A readout whose shape-within-colour accuracy sits at chance does not carry the shape, whatever its
colour accuracy.
"""

from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog

from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.data.image_io import read_image
from ov_seg.evaluation.mask_classification import attribute_probe_metrics
from ov_seg.modeling.clip import TextClassifier, clip_sizes
from ov_seg.modeling.clip.builder import CLIP_PIXEL_MEAN
from ov_seg.modeling.clip.masked_crops import mask_boxes, normalize_clip, prepare_masked_crops
from ov_seg.modeling.heads.mgca import DenseCLIPEncoder

__all__ = ["clip_readouts", "CROP_READOUTS"]

# name -> (expand ratio, square box) of the masked-crop readouts
CROP_READOUTS = {
    "masked crop x1": (1.0, False),
    "masked crop x1.15": (1.15, False),
    "masked crop x1 square": (1.0, True),
    "masked crop x1.4 square": (1.4, True),
}


def _read_image(path: str) -> torch.Tensor:
    """(3, H, W) float RGB 0-255 (``ov_seg.data.image_io.read_image``)."""
    image = read_image(path, "RGB", fast=True)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def _unmasked_crops(image: torch.Tensor, masks: torch.Tensor, size: int) -> torch.Tensor:
    """(K, 3, size, size) normalised crops of each mask's tight box, scene pixels kept."""
    crops = []
    for x0, y0, x1, y1 in mask_boxes(masks).tolist():
        x0, y0 = int(np.floor(x0)), int(np.floor(y0))
        x1, y1 = max(int(np.ceil(x1)), x0 + 1), max(int(np.ceil(y1)), y0 + 1)
        window = image[None, :, y0:y1, x0:x1]
        crops.append(F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False))
    return normalize_clip(torch.cat(crops))


@torch.no_grad()
def clip_readouts(
    clip_model: torch.nn.Module,
    dataset: str,
    templates: Sequence[str],
    num_images: int = 0,
    scene_sizes: Sequence[int] = (64, 128),
) -> Dict[str, Dict[str, float]]:
    """The attribute probe of every readout (module doc) over the ground-truth class regions of
    ``dataset`` (a semantic-segmentation dataset whose metadata has ``class_attributes``).

    Args:
        clip_model: an open_clip ``CLIP`` with a ``VisionTransformer`` image tower (eval mode).
        dataset: registered dataset name.
        templates: prompt templates of the class embeddings.
        num_images: the first this many images (0 = all).
        scene_sizes: sizes S of the scene-level readouts (multiples of the patch size).

    Returns:
        readout name -> ``attribute_probe_metrics`` (plus ``segments``).
    """
    meta = MetadataCatalog.get(dataset)
    attributes = dict(meta.get("class_attributes", {}) or {})
    if not attributes:
        raise ValueError(f"{dataset}: no class_attributes metadata, nothing to probe")
    names = list(meta.stuff_classes)
    ignore = int(meta.get("ignore_label", 255))
    texts = F.normalize(
        TextClassifier(clip_model, templates=tuple(templates)).encode_prompts(names).mean(1), dim=-1
    )
    size = clip_sizes(clip_model).image_size
    grey = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    towers = {
        vp: DenseCLIPEncoder(
            clip_model.visual, freeze_at=len(clip_model.visual.transformer.resblocks), value_path=vp
        )
        for vp in (False, True)
    }
    dicts = DatasetCatalog.get(dataset)
    dicts = dicts[:num_images] if num_images > 0 else dicts
    scores: Dict[str, List[torch.Tensor]] = OrderedDict()
    labels: List[int] = []

    def add(name: str, emb: torch.Tensor) -> None:
        scores.setdefault(name, []).append(F.normalize(emb.float(), dim=-1) @ texts.t())

    for d in dicts:
        image = _read_image(d["file_name"])
        gt = read_label_image(d["sem_seg_file_name"]).astype(np.int64)
        classes = [int(c) for c in np.unique(gt) if c != ignore]
        if not classes:
            continue
        masks = torch.stack([torch.from_numpy(gt == c) for c in classes])
        labels += classes
        for name, (ratio, square) in CROP_READOUTS.items():
            crops = prepare_masked_crops(
                image, masks, expand_ratio=ratio, out_size=size, square=square
            )
            emb = torch.zeros(len(classes), texts.shape[1])
            emb[crops.valid] = clip_model.encode_image(crops.images).float()
            add(name, emb)
        add("unmasked crop x1", clip_model.encode_image(_unmasked_crops(image, masks, size)))
        for s in scene_sizes:
            scene = F.interpolate(image[None], size=(s, s), mode="bilinear", align_corners=False)
            full = F.interpolate(masks[:, None].float(), size=(s, s), mode="nearest")
            masked = normalize_clip(scene * full + grey * (1 - full))
            add(f"masked scene, {s} px", towers[False](masked).mean((2, 3)))
            for vp, tower in towers.items():
                tokens = tower(normalize_clip(scene))[0]  # (D, h, w)
                weights = F.interpolate(
                    masks[:, None].float(), size=tokens.shape[-2:], mode="area"
                )[:, 0]
                pooled = torch.einsum("dhw,khw->kd", tokens, weights)
                label = "dense tokens (value path)" if vp else "dense tokens"
                add(f"{label}, {s} px", pooled / weights.sum((1, 2)).clamp_min(1e-6)[:, None])
    truth = torch.tensor(labels, dtype=torch.long)
    seen, unseen = meta.get("seen_class_ids", []), meta.get("unseen_class_ids", [])
    return OrderedDict(
        (name, dict(attribute_probe_metrics(torch.cat(rows), truth, attributes, seen, unseen)))
        for name, rows in scores.items()
    )
