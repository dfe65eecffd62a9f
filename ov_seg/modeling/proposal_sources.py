"""Where the two-stage model's mask proposals come from (``MODEL.TWO_STAGE.PROPOSAL_SOURCE``).

- ``"maskformer"``: the trained ``ProposalMaskFormer`` (its weights from
  ``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS`` or from a merged checkpoint in ``MODEL.WEIGHTS``).
- ``"precomputed"``: masks read from disk, one file per image, so that any other mask generator can
  feed the second stage (``MODEL.TWO_STAGE.PROPOSAL_DIR``). The file of an image is ``<dir>/<image
  stem>.npz`` or ``<dir>/<image stem>.json`` (``save_precomputed_proposals`` writes both formats):

  * ``.npz``: ``masks`` (Q, H, W), bool / uint8 (binary, non-zero = foreground) or float
    (probabilities in [0, 1]); optional ``scores`` (Q,) objectness in [0, 1].
  * ``.json``: ``{"masks": [RLE, ...], "scores": [...]}`` with COCO RLEs (``{"size": [H, W],
    "counts"}``), or a list of ``{"segmentation": RLE, "score" | "predicted_iou": s}`` records (the
    ``coco_rle`` output of Segment Anything's automatic mask generator).

  Masks of any resolution are resized to the network input; missing scores are 1.
"""

import json
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from pycocotools import mask as mask_util
from torch import nn
from torch.nn import functional as F

from ov_seg.modeling.fusion import proposal_class_probs
from ov_seg.modeling.meta_arch.proposal_maskformer import ProposalMaskFormer
from ov_seg.utils.registry import NamedRegistry, get_registered

__all__ = [
    "PROPOSAL_SOURCE_REGISTRY",
    "Proposals",
    "build_proposal_source",
    "MaskFormerProposalSource",
    "PrecomputedProposalSource",
    "load_proposal_weights",
    "save_precomputed_proposals",
    "load_precomputed_proposals",
    "precomputed_proposal_path",
    "write_ground_truth_proposals",
]

PROPOSAL_SOURCE_REGISTRY = NamedRegistry("PROPOSAL_SOURCE")
PROPOSAL_SOURCE_REGISTRY.__doc__ = """
Registry of proposal sources of ``TwoStageOVSeg``, chosen by ``MODEL.TWO_STAGE.PROPOSAL_SOURCE``. A
registered class is an ``nn.Module`` that is ``@configurable`` with ``from_config(cls, cfg,
clip_model=None)`` (the two-stage model's CLIP, for sources that can share it), has a bool attribute
``has_class_scores`` and is called as ``source(batched_inputs, vocabulary) -> List[Proposals]`` (one
per input, masks at the input image's size ``x["image"].shape[-2:]``).
"""

# Suffixes of precomputed proposal files, in lookup order.
PRECOMPUTED_SUFFIXES = (".npz", ".json")


class Proposals(NamedTuple):
    """The proposals of one image (Q proposals, K vocabulary names)."""

    masks: torch.Tensor  # (Q, H, W) float mask probabilities σ(m_q) at the network input size
    scores: torch.Tensor  # (Q,) objectness in [0, 1]
    class_probs: Optional[
        torch.Tensor
    ]  # (Q, K) proposal-head probabilities (no "no object"), or None


def build_proposal_source(cfg, clip_model: Optional[nn.Module] = None) -> nn.Module:
    """The proposal source named by ``cfg.MODEL.TWO_STAGE.PROPOSAL_SOURCE``; ``clip_model`` (the
    two-stage model's CLIP) is shared with sources that need one (the open-vocabulary class head).
    """
    name = cfg.MODEL.TWO_STAGE.PROPOSAL_SOURCE
    cls = get_registered(
        PROPOSAL_SOURCE_REGISTRY, name, "proposal source (MODEL.TWO_STAGE.PROPOSAL_SOURCE)"
    )
    return cls(cfg, clip_model=clip_model)


def load_proposal_weights(model: nn.Module, path: str) -> None:
    """Load a ``ProposalMaskFormer`` checkpoint (train_net's ``{"model": state_dict, ...}`` or a
    plain state dict; a merged two-stage checkpoint also works: its ``proposal_source.model.`` keys
    are used) with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file. KeyError: keys differ (the message names them).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"proposal generator checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    prefix = "proposal_source.model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {path} does not match the proposal generator of this config: missing keys "
            f"{missing[:10]} ({len(missing)}), unexpected keys {unexpected[:10]} "
            f"({len(unexpected)})"
        )
    model.load_state_dict(state, strict=True)


@PROPOSAL_SOURCE_REGISTRY.register("maskformer")
class MaskFormerProposalSource(nn.Module):
    """Proposals of a ``ProposalMaskFormer`` (registered as the submodule ``model``).

    ``has_class_scores`` is True with the open-vocabulary class head (its probabilities over the
    vocabulary are ``class_probs``) and False with the class-agnostic head (then only λ = 1 is
    possible). Scores are the model's proposal scores (``MODEL.MASK_FORMER.TEST.PROPOSAL_SCORE``: 1
    − p(no object) by default).
    """

    @configurable
    def __init__(self, *, model: ProposalMaskFormer, weights: str = ""):
        """
        Args:
            model: the proposal generator.
            weights: optional checkpoint loaded into ``model`` (see ``load_proposal_weights``).
        """
        super().__init__()
        self.model = model
        if weights:
            load_proposal_weights(model, weights)
        self.has_class_scores = not getattr(model.class_head, "class_agnostic", False)

    @classmethod
    def from_config(cls, cfg, clip_model: Optional[nn.Module] = None):
        # only the raw proposals are needed: the generator's own semantic / panoptic outputs stay
        # off
        args = ProposalMaskFormer.from_config(cfg, clip_model)
        args.update(semantic_on=False, panoptic_on=False, proposals_on=True)
        return {
            "model": ProposalMaskFormer(**args),
            "weights": cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS,
        }

    @torch.no_grad()
    def forward(self, batched_inputs: Sequence[dict], vocabulary: Sequence[str]) -> List[Proposals]:
        """
        Args:
            batched_inputs: dicts with ``image`` (3, H, W) in ``INPUT.FORMAT``.
            vocabulary: K class names for the open-vocabulary head.

        Returns:
            one ``Proposals`` per input, masks (Q, H, W) at the input size.
        """
        inputs = [{"image": x["image"], "vocabulary": list(vocabulary)} for x in batched_inputs]
        out = []
        for p in self.model.predict_proposals(inputs):
            probs = proposal_class_probs(p["class_logits"]) if self.has_class_scores else None
            out.append(Proposals(p["masks"], p["scores"].float(), probs))
        return out


def precomputed_proposal_path(root: Union[str, Path], file_name: str) -> Path:
    """The proposal file of the image ``file_name`` under ``root`` (first existing suffix).

    Raises:
        FileNotFoundError: no file for that image (the message names the paths tried).
    """
    stem = Path(file_name).stem
    tried = [Path(root) / f"{stem}{suffix}" for suffix in PRECOMPUTED_SUFFIXES]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no precomputed proposals for image {file_name}: tried {', '.join(str(p) for p in tried)}"
    )


def _decode_rles(rles: Sequence[dict]) -> np.ndarray:
    rles = [
        dict(r, counts=r["counts"].encode("ascii")) if isinstance(r["counts"], str) else r
        for r in rles
    ]
    if not rles:
        return np.zeros((0, 1, 1), dtype=bool)
    return mask_util.decode(rles).transpose(2, 0, 1).astype(bool)


def load_precomputed_proposals(path: Union[str, Path]) -> Proposals:
    """Read one precomputed proposal file (format in the module docstring).

    Returns:
        ``Proposals`` with masks (Q, H, W) float in [0, 1] at the stored resolution, scores (Q,) and
        no class probabilities.

    Raises:
        ValueError: unknown suffix or malformed content.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "masks" not in data:
                raise ValueError(f"{path}: no 'masks' array")
            masks = data["masks"]
            scores = data["scores"] if "scores" in data else None
        if masks.ndim != 3:
            raise ValueError(f"{path}: masks must be (Q, H, W), got shape {masks.shape}")
        if masks.dtype.kind in "biu":
            masks = masks != 0
        masks = torch.from_numpy(np.clip(masks.astype(np.float32), 0.0, 1.0))
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):  # Segment Anything's coco_rle records
            rles = [r["segmentation"] for r in data]
            scores = [r.get("score", r.get("predicted_iou", 1.0)) for r in data]
        elif isinstance(data, dict) and "masks" in data:
            rles, scores = data["masks"], data.get("scores")
        else:
            raise ValueError(
                f"{path}: expected {{'masks': [RLE, ...]}} or a list of records with 'segmentation'"
            )
        masks = torch.from_numpy(_decode_rles(rles).astype(np.float32))
    else:
        raise ValueError(
            f"{path}: unknown proposal file type (known: {', '.join(PRECOMPUTED_SUFFIXES)})"
        )
    num = masks.shape[0]
    scores = (
        torch.ones(num) if scores is None else torch.as_tensor(np.asarray(scores, dtype=np.float32))
    )
    if scores.shape != (num,):
        raise ValueError(f"{path}: {num} masks but scores of shape {tuple(scores.shape)}")
    return Proposals(masks, scores.clamp(0.0, 1.0), None)


def save_precomputed_proposals(
    path: Union[str, Path], masks: torch.Tensor, scores: Optional[torch.Tensor] = None
) -> Path:
    """Write the proposals of one image (atomic: temporary file + rename).

    Args:
        path: ``.npz`` (masks kept as given: bool, or float stored as float16) or ``.json`` (COCO
            RLE of the masks; float masks are binarised at 0.5).
        masks: (Q, H, W) bool or float in [0, 1].
        scores: optional (Q,) objectness.

    Returns:
        the path written.
    """
    path = Path(path)
    if masks.dim() != 3:
        raise ValueError(f"masks must be (Q, H, W), got {tuple(masks.shape)}")
    masks = masks.detach().cpu()
    if scores is not None:
        scores = scores.detach().cpu().float()
        if scores.shape != masks.shape[:1]:
            raise ValueError(f"{masks.shape[0]} masks but scores of shape {tuple(scores.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".npz":
        arrays = {"masks": masks.numpy() if masks.dtype == torch.bool else masks.half().numpy()}
        if scores is not None:
            arrays["scores"] = scores.numpy()
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    elif path.suffix == ".json":
        binary = masks if masks.dtype == torch.bool else masks >= 0.5
        rles = mask_util.encode(
            np.asfortranarray(binary.numpy().transpose(1, 2, 0).astype(np.uint8))
        )
        obj = {"masks": [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]}
        if scores is not None:
            obj["scores"] = scores.tolist()
        tmp.write_text(json.dumps(obj))
    else:
        raise ValueError(
            f"{path}: unknown proposal file type (known: {', '.join(PRECOMPUTED_SUFFIXES)})"
        )
    os.replace(tmp, path)
    return path


@PROPOSAL_SOURCE_REGISTRY.register("precomputed")
class PrecomputedProposalSource(nn.Module):
    """Proposals read from ``root`` (one file per image, found by the stem of the input's
    ``file_name``).

    They carry no class scores (``has_class_scores`` False): the two-stage model classifies them
        with CLIP
    only (λ = 1).
    """

    has_class_scores = False

    @configurable
    def __init__(self, *, root: str):
        """
        Args:
            root: directory of the proposal files.
        """
        super().__init__()
        if not root:
            raise ValueError("the precomputed proposal source needs MODEL.TWO_STAGE.PROPOSAL_DIR")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"MODEL.TWO_STAGE.PROPOSAL_DIR {root!r} is not a directory")
        self.root = Path(root)

    @classmethod
    def from_config(cls, cfg, clip_model: Optional[nn.Module] = None):
        return {"root": cfg.MODEL.TWO_STAGE.PROPOSAL_DIR}

    def forward(self, batched_inputs: Sequence[dict], vocabulary: Sequence[str]) -> List[Proposals]:
        """
        Args:
            batched_inputs: dicts with ``image`` (3, H, W) and ``file_name``.
            vocabulary: unused (no class scores).

        Returns:
            one ``Proposals`` per input, masks resized (bilinear) to the input size.
        """
        out = []
        for x in batched_inputs:
            if "file_name" not in x:
                raise KeyError(
                    "precomputed proposals are found by the input's 'file_name', which is missing"
                )
            p = load_precomputed_proposals(precomputed_proposal_path(self.root, x["file_name"]))
            size = tuple(x["image"].shape[-2:])
            masks = p.masks
            if masks.shape[0] and tuple(masks.shape[-2:]) != size:
                masks = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[
                    0
                ]
            elif not masks.shape[0]:
                masks = masks.new_zeros((0, *size))
            out.append(Proposals(masks, p.scores, None))
        return out


def write_ground_truth_proposals(dataset_name: str, out_dir: Union[str, Path]) -> int:
    """Write the ground-truth segments of a registered panoptic dataset as precomputed proposals
    (one ``<image stem>.npz`` per image, bool masks, scores 1): the oracle input of
    ``MODEL.TWO_STAGE.PROPOSAL_SOURCE precomputed``, which measures classification alone.

    Returns:
        the number of images written.
    """
    from detectron2.data import DatasetCatalog
    from PIL import Image

    count = 0
    for d in DatasetCatalog.get(dataset_name):
        if "pan_seg_file_name" not in d:
            raise KeyError(f"{dataset_name} is not a panoptic dataset (no pan_seg_file_name)")
        rgb = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segs = d.get("segments_info") or []
        masks = (
            np.stack([ids == s["id"] for s in segs]) if segs else np.zeros((0, *ids.shape), bool)
        )
        stem = Path(d["file_name"]).stem
        save_precomputed_proposals(Path(out_dir) / f"{stem}.npz", torch.from_numpy(masks))
        count += 1
    return count
