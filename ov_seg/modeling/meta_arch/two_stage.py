"""``TwoStageOVSeg``: OVSeg's two-stage open-vocabulary segmentation (evaluation and demo, one
class).

Stages (each a method, so that each can be timed or replaced):

1. ``generate_proposals``: Q soft masks per image (and proposal-head class scores) from a proposal
   source (``MODEL.TWO_STAGE.PROPOSAL_SOURCE``: the trained ``ProposalMaskFormer`` or precomputed
   masks);
2. ``prepare_crops``: masked crops of the masks binarised at ``MODEL.CLIP.MASK_THR`` (empty masks
   give no crop), one vectorised pass per image;
3. ``encode_crops``: the mask-adapted CLIP image tower (with mask prompts when the checkpoint has
   them);
4. ``text_embeddings``: prompt-ensembled class-name embeddings of the vocabulary (cached);
5. ``fuse``: p = p_proposal^(1−λ) · p_clip^λ (``ov_seg.modeling.fusion``), optionally
   seen-class calibrated (``MODEL.SEEN_CALIBRATION``: each proposal's class distribution with γ
   subtracted from the log-scores of the names seen in training, its mass kept), then the semantic
   output Σ_q p_q(c) σ(m_q) and the panoptic output (MaskFormer merge).

The vocabulary of an input is its ``vocabulary`` list (set by the per-dataset mappers from the
dataset's ``stuff_classes``, or given explicitly, e.g. by the demo), else the classes of its
``dataset_name``, else those of the first test dataset. A single class name gets
``MODEL.TWO_STAGE.BACKGROUND_NAME`` appended.

Fast inference (``MODEL.TWO_STAGE.FAST``, notes/fast_inference.md): proposals below an objectness
threshold are skipped, near-duplicate masks share one CLIP result, the image tower can be int8
quantized, crops can be smaller than the CLIP's input size (except for the few largest masks of an
image, ``FULL_SIZE_CROPS``; ``prepare_crop_groups``), the proposal network can run channels-last,
and ``CLIP_MODE "single_pass"``
replaces the per-crop forwards by one forward on the whole image (``SinglePassMaskEmbedder``). Every
mode keeps the output contract. The defaults are exact (only identical masks share a crop).

Per call, ``InferenceOptions`` (``model(inputs, options=...)``) set λ, MASK_THR, γ, the vocabulary
and the per-call fast modes (MIN_OBJECTNESS, DUPLICATE_IOU); ``model.default_options`` holds the
config's. Searches split the stages through public methods: ``encode_proposals`` (stage 1, bound
to the vocabulary), ``encode_clip_inputs`` (stages 2-3, bound to MASK_THR) and ``predict``
(stages 4-5, any λ and γ); a ``StageTimer`` passed to ``inference`` records each stage's time.

Weights: the proposal generator from ``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS`` and the adapted CLIP from
``MODEL.CLIP.PRETRAINED`` (its exported checkpoint carries the mask prompts), or one merged
checkpoint (``tools/merge_checkpoints.py``) as ``MODEL.WEIGHTS``.
"""

import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from ov_seg.modeling.calibration import SeenCalibration, trained_names
from ov_seg.modeling.clip import MaskedCropClassifier, build_clip_from_cfg, normalize_clip
from ov_seg.modeling.clip.quantize import quantize_vision_linears
from ov_seg.modeling.clip.single_pass import SinglePassMaskEmbedder
from ov_seg.modeling.fusion import (
    calibrate_query_probs,
    clip_class_probs,
    geometric_ensemble,
    panoptic_class_logits,
    semantic_scores,
    with_background_name,
)
from ov_seg.modeling.heads.proposal_selection import (
    duplicate_representatives,
    largest_masks,
    objectness_keep,
)
from ov_seg.modeling.meta_arch.base import (
    FastModes,
    InferenceOptions,
    OpenVocabSegmentor,
    StageTimer,
    default_test_vocabulary,
    stage,
)
from ov_seg.modeling.meta_arch.proposal_maskformer import ProposalMaskFormer
from ov_seg.modeling.postprocess import (
    chunked_semantic_output,
    dense_fits,
    resized_panoptic,
    semantic_output,
)
from ov_seg.modeling.proposal_sources import Proposals, build_proposal_source
from ov_seg.utils.memory_format import convs_to_channels_last

__all__ = ["TwoStageOVSeg", "TwoStageEncoding", "merged_checkpoint_info"]

logger = logging.getLogger(__name__)

# key of the mask prompts in the state dict of a TwoStageOVSeg (merged checkpoints)
PROMPTS_KEY = "crop_classifier.encoder.prompts"


class MergedCheckpointInfo(NamedTuple):
    """What building a ``TwoStageOVSeg`` needs to know of a merged checkpoint before loading it."""

    prompts_shape: Optional[Tuple[int, ...]]  # mask prompts (depth, grid², width), or None
    clip_activation: Optional[str]  # meta["clip_activation"]: "quick_gelu" / "gelu", or None


def merged_checkpoint_info(path: str) -> MergedCheckpointInfo:
    """The mask-prompt shape and CLIP activation recorded in a merged two-stage checkpoint
    (``tools/merge_checkpoints.py``, ``tools/convert_ovseg_checkpoint.py``); None fields for no
    such local file or no such record. Read with ``torch.load(weights_only=True, mmap=True)``:
    no tensor data is loaded."""
    if not path or not os.path.isfile(path):
        return MergedCheckpointInfo(None, None)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else {}
    prompts = state.get(PROMPTS_KEY) if isinstance(state, dict) else None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    activation = meta.get("clip_activation") if isinstance(meta, dict) else None
    return MergedCheckpointInfo(
        tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else None, activation
    )


def _dataset_thing_ids(dataset_name: str) -> Optional[List[int]]:
    if not dataset_name or dataset_name not in DatasetCatalog.list():
        return None
    mapping = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id", None)
    return None if mapping is None else sorted(int(v) for v in mapping.values())


class CropGroup(NamedTuple):
    """Masked crops of one size, for the masks ``selected`` of each image (stage 2 of "crops")."""

    selected: List[torch.Tensor]  # per image (Q_i,) bool: the masks cropped in this group
    crops: torch.Tensor  # (N, 3, S, S) normalised crops of the valid selected masks
    crop_masks: torch.Tensor  # (N, S, S) bool
    valid: List[torch.Tensor]  # per image (number selected,) bool: non-empty selected masks


class TwoStageEncoding(NamedTuple):
    """The vocabulary-bound, λ- and γ-free part of the two-stage inference on one input
    (``TwoStageOVSeg.encode_inputs``): its proposals and, when the CLIP branch ran, the embeddings
    of its distinct masks."""

    input: dict  # the detectron2 input dict
    vocabulary: Tuple[str, ...]  # the final vocabulary (the proposal head scored these names)
    proposals: Proposals  # after the objectness skip: masks (Q, H, W), scores, class_probs
    mask_thr: float  # MASK_THR of the crops
    clip_embeds: Optional[torch.Tensor] = None  # (N, D) of the valid distinct masks
    valid: Optional[torch.Tensor] = None  # (Q_u,) bool over the distinct masks (N True)
    inverse: Optional[torch.Tensor] = None  # (Q,) index of each proposal's distinct mask


@META_ARCH_REGISTRY.register()
class TwoStageOVSeg(OpenVocabSegmentor):
    """Proposals → masked crops → mask-adapted CLIP, fused with the proposal head (inference only).

    Input (``batched_inputs``): dicts with ``image`` (3, H, W) in ``INPUT.FORMAT`` (0-255); optional
    ``height``/``width`` (output size; default the input size), ``vocabulary`` (class names),
    ``dataset_name``, ``file_name`` (needed by the precomputed proposal source).

    Output per image: ``sem_seg`` (K, height, width) class scores (SEMANTIC_ON; (height, width)
    int64 labels and ``sem_seg_empty`` when the scores exceed ``TEST.MEMORY_BUDGET_MB``, see
    ``ov_seg.modeling.postprocess.semantic_output``), ``panoptic_seg``
    ((height, width) int32 segment ids, 0 = void, and ``segments_info``) (PANOPTIC_ON), and
    ``vocabulary``, the K names the channels / category ids refer to (the input vocabulary, plus the
    background name for a single class).
    """

    @configurable
    def __init__(
        self,
        *,
        proposal_source: nn.Module,
        crop_classifier: MaskedCropClassifier,
        ensemble_weight: float = 0.7,
        seen_ensemble_weight: Optional[float] = None,
        seen_names: Sequence[str] = (),
        input_format: str = "RGB",
        vocabulary: Sequence[str] = (),
        thing_ids: Optional[Sequence[int]] = None,
        background_name: str = "others",
        semantic_on: bool = True,
        panoptic_on: bool = False,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        memory_budget_mb: float = 0.0,
        min_objectness: float = 0.0,
        duplicate_iou: float = 1.0,
        clip_mode: str = "crops",
        single_pass: Optional[SinglePassMaskEmbedder] = None,
        quantize: str = "none",
        crop_size: int = 0,
        full_size_crops: int = 0,
        channels_last: bool = False,
        seen_calibration: Optional[SeenCalibration] = None,
    ):
        """
        Args:
            proposal_source: a ``PROPOSAL_SOURCE_REGISTRY`` module (``source(inputs, vocabulary)``).
            crop_classifier: the CLIP branch (masked crops, image tower with mask prompts, text
                classifier).
            ensemble_weight: λ in [0, 1] (1 = CLIP only, 0 = proposal head only).
            seen_ensemble_weight: λ_s in [0, 1], the CLIP exponent of the ``seen_names``; None =
                λ (``geometric_ensemble``).
            seen_names: the names the proposal head was trained on (used with
                ``seen_ensemble_weight``).
            input_format: "RGB" or "BGR", the channel order of the input images.
            vocabulary: default class names (inputs without ``vocabulary`` / ``dataset_name``).
            thing_ids: contiguous ids of the default vocabulary that are things (panoptic; others
                are stuff, merged per class); None = every class is a thing.
            background_name: appended to a single-class vocabulary.
            semantic_on, panoptic_on: outputs.
            object_mask_threshold: panoptic: keep proposals whose fused class probability ×
                objectness exceeds this.
            overlap_threshold: panoptic: drop a proposal whose visible area / own area is below
                this.
            min_objectness: skip proposals with a lower objectness (0 = keep all).
            duplicate_iou: proposals whose binarised masks overlap a higher-scoring one with IoU >=
                this reuse its CLIP result (1.0 = identical masks only, exact; > 1 = off).
            clip_mode: ``CLIP_MODES`` name: "crops" (OVSeg) or "single_pass".
            single_pass: the ``SinglePassMaskEmbedder`` of "single_pass" (built from the crop
                classifier's CLIP when None).
            quantize: "none" or "int8_dynamic" (the CLIP image tower's linear layers, CPU only;
                applied at the first forward, once every weight is loaded).
            crop_size: side of the masked crops in pixels, a multiple of the patch size (0 = the
                CLIP's input size).
            full_size_crops: with a smaller ``crop_size``, the masks with the largest areas (this
                many per image) keep crops of the CLIP's input size.
            channels_last: run the proposal network's convolutions in the channels-last memory
                format (oneDNN's preferred layout on CPUs; float rounding differs from the default
                layout; applied at the first forward).
            seen_calibration: calibrated stacking of the fused scores (``calibrate_query_probs``
                with −γ for the seen names); None = off.
            memory_budget_mb: MiB of full-resolution output maps per image
                (``TEST.MEMORY_BUDGET_MB``; 0 = unbounded): larger outputs are made a chunk of
                names / masks at a time and ``sem_seg`` becomes the label map.
        """
        super().__init__(
            seen_calibration=seen_calibration,
            default_vocabulary=vocabulary,
            input_format=input_format,
            memory_budget_mb=memory_budget_mb,
        )
        if not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(
                f"MODEL.TWO_STAGE.ENSEMBLE_WEIGHT must be in [0, 1], got {ensemble_weight}"
            )
        if ensemble_weight < 1.0 and not proposal_source.has_class_scores:
            raise ValueError(
                f"MODEL.TWO_STAGE.ENSEMBLE_WEIGHT {ensemble_weight} < 1 needs class scores from "
                f"the proposal source, but {type(proposal_source).__name__} has none "
                "(class-agnostic head or precomputed masks): use ENSEMBLE_WEIGHT 1.0 (CLIP only)"
            )
        if seen_ensemble_weight is not None:
            if not 0.0 <= seen_ensemble_weight <= 1.0:
                raise ValueError(
                    "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT must be in [0, 1] (or < 0: the same as "
                    f"ENSEMBLE_WEIGHT), got {seen_ensemble_weight}"
                )
            if not seen_names:
                raise ValueError(
                    "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT needs the names the proposal head was "
                    "trained on: DATASETS.TEST with seen_classes metadata, or "
                    "MODEL.SEEN_CALIBRATION.SEEN_NAMES"
                )
            if seen_ensemble_weight < 1.0 and not proposal_source.has_class_scores:
                raise ValueError(
                    f"MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT {seen_ensemble_weight} < 1 needs class "
                    f"scores from the proposal source, but {type(proposal_source).__name__} has "
                    "none: leave it at -1 (the same as ENSEMBLE_WEIGHT)"
                )
        if not (semantic_on or panoptic_on):
            raise ValueError("TwoStageOVSeg needs MODEL.TWO_STAGE.TEST.SEMANTIC_ON or PANOPTIC_ON")
        self.proposal_source = proposal_source
        self.crop_classifier = crop_classifier
        self.ensemble_weight = float(ensemble_weight)
        self.seen_ensemble_weight = (
            None if seen_ensemble_weight is None else float(seen_ensemble_weight)
        )
        self.seen_names = frozenset(seen_names)
        self.thing_ids = None if thing_ids is None else [int(i) for i in thing_ids]
        self.background_name = background_name
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        if clip_mode not in CLIP_MODES:
            raise KeyError(
                f"MODEL.TWO_STAGE.FAST.CLIP_MODE {clip_mode!r} unknown; known: {sorted(CLIP_MODES)}"
            )
        if quantize not in QUANTIZERS:
            raise KeyError(
                f"MODEL.TWO_STAGE.FAST.QUANTIZE {quantize!r} unknown; known: {sorted(QUANTIZERS)}"
            )
        self.min_objectness = float(min_objectness)
        self.duplicate_iou = float(duplicate_iou)
        self.clip_mode = clip_mode
        if clip_mode == "single_pass" and single_pass is None:
            single_pass = SinglePassMaskEmbedder(crop_classifier.clip.visual)
        self.single_pass = single_pass
        self.quantize = quantize
        self.channels_last = bool(channels_last)
        self._fast_prepared = False
        self.full_crop_size = crop_classifier.crop_size  # the CLIP's input size
        if full_size_crops < 0:
            raise ValueError(
                f"MODEL.TWO_STAGE.FAST.FULL_SIZE_CROPS must be >= 0, got {full_size_crops}"
            )
        self.full_size_crops = int(full_size_crops)
        if crop_size:
            crop_classifier.crop_size = crop_classifier.check_crop_size(
                crop_size, "MODEL.TWO_STAGE.FAST.CROP_SIZE"
            )

    @classmethod
    def from_config(cls, cfg):
        ccfg, tcfg = cfg.MODEL.CLIP, cfg.MODEL.TWO_STAGE
        # a merged checkpoint (MODEL.WEIGHTS, loaded after building) may hold the mask prompts
        # (create the parameter so that the checkpoint fills it) and record the CLIP activation
        # (used by ACTIVATION "auto" when the CLIP weights come from it, PRETRAINED "")
        info = merged_checkpoint_info(cfg.MODEL.WEIGHTS)
        activation = None
        if ccfg.ACTIVATION == "auto" and not ccfg.PRETRAINED and info.clip_activation:
            activation = info.clip_activation
        clip_model = build_clip_from_cfg(cfg, activation=activation)
        merged = info.prompts_shape
        if merged is not None and merged[0] != ccfg.MASK_PROMPT_DEPTH:
            raise ValueError(
                f"MODEL.WEIGHTS holds mask prompts of depth {merged[0]}, but "
                f"MODEL.CLIP.MASK_PROMPT_DEPTH is {ccfg.MASK_PROMPT_DEPTH}"
            )
        crop_classifier = MaskedCropClassifier(
            **MaskedCropClassifier.from_config(
                cfg, clip_model=clip_model, train_prompts=merged is not None
            )
        )
        crop_classifier.requires_grad_(False)
        test_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else ""
        proposal_source = build_proposal_source(cfg, clip_model)
        # the open-vocabulary proposal head embeds the same names with the same CLIP: one cache
        head = getattr(getattr(proposal_source, "model", None), "class_head", None)
        head_text = getattr(head, "text_classifier", None)
        if head_text is not None and hasattr(head_text, "share_cache"):
            head_text.share_cache(crop_classifier.text_classifier)
        fcfg = tcfg.FAST
        single_pass = None
        if fcfg.CLIP_MODE == "single_pass":
            single_pass = SinglePassMaskEmbedder(
                clip_model.visual,
                pooling=fcfg.SINGLE_PASS_POOLING,
                layers=fcfg.SINGLE_PASS_LAYERS,
                size=fcfg.SINGLE_PASS_SIZE,
            )
        return {
            "proposal_source": proposal_source,
            "crop_classifier": crop_classifier,
            "ensemble_weight": tcfg.ENSEMBLE_WEIGHT,
            "seen_ensemble_weight": (
                None if tcfg.SEEN_ENSEMBLE_WEIGHT < 0 else tcfg.SEEN_ENSEMBLE_WEIGHT
            ),
            "seen_names": trained_names(cfg),
            "input_format": cfg.INPUT.FORMAT,
            "vocabulary": default_test_vocabulary(cfg),
            "thing_ids": _dataset_thing_ids(test_name),
            "background_name": tcfg.BACKGROUND_NAME,
            "semantic_on": tcfg.TEST.SEMANTIC_ON,
            "panoptic_on": tcfg.TEST.PANOPTIC_ON,
            "object_mask_threshold": tcfg.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": tcfg.TEST.OVERLAP_THRESHOLD,
            "min_objectness": fcfg.MIN_OBJECTNESS,
            "duplicate_iou": fcfg.DUPLICATE_IOU,
            "clip_mode": fcfg.CLIP_MODE,
            "single_pass": single_pass,
            "quantize": fcfg.QUANTIZE,
            "crop_size": fcfg.CROP_SIZE,
            "full_size_crops": fcfg.FULL_SIZE_CROPS,
            "channels_last": fcfg.CHANNELS_LAST,
            "seen_calibration": SeenCalibration(cfg),
            "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        }

    @property
    def text_classifier(self):
        """The CLIP branch's ``TextClassifier`` (the model's one text side)."""
        return self.crop_classifier.text_classifier

    @property
    def default_options(self) -> InferenceOptions:
        """The config's λ, MASK_THR, γ and per-call fast modes."""
        return InferenceOptions(
            ensemble_weight=self.ensemble_weight,
            seen_ensemble_weight=self.seen_ensemble_weight,
            mask_thr=self.crop_classifier.mask_thr,
            seen_gamma=self.seen_calibration.gamma,
            fast=FastModes(min_objectness=self.min_objectness, duplicate_iou=self.duplicate_iou),
        )

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self, x: dict, options: Optional[InferenceOptions] = None) -> List[str]:
        """The final class names of one input: ``OpenVocabSegmentor.vocabulary`` with the
        background name appended to a single class.

        Raises:
            ValueError: empty vocabulary. KeyError: unknown ``dataset_name``.
        """
        return with_background_name(super().vocabulary(x, options), self.background_name)

    def thing_ids_for(self, x: dict, vocabulary: Sequence[str]) -> List[int]:
        """Contiguous ids of the thing classes of an input's vocabulary: from its dataset's panoptic
        metadata, else the default ones for the default vocabulary, else every class (a custom
        vocabulary has no thing / stuff split: each segment stays an instance)."""
        ids = _dataset_thing_ids(x.get("dataset_name", ""))
        if ids is None and list(vocabulary) == self.default_vocabulary:
            ids = self.thing_ids
        return list(range(len(vocabulary))) if ids is None else ids

    # ------------------------------------------------------------------ stages
    def generate_proposals(
        self, batched_inputs: Sequence[dict], vocabulary: Sequence[str]
    ) -> List[Proposals]:
        """Stage 1: proposals of each input at its input size, on the model's device."""
        out = self.proposal_source(batched_inputs, vocabulary)
        return [
            Proposals(
                p.masks.to(self.device).float(),
                p.scores.to(self.device).float(),
                None if p.class_probs is None else p.class_probs.to(self.device).float(),
            )
            for p in out
        ]

    def rgb_images(self, batched_inputs: Sequence[dict]) -> List[torch.Tensor]:
        """The input images as (3, H, W) float RGB 0-255 on the model's device."""
        images = []
        for x in batched_inputs:
            image = x["image"].to(self.device).float()
            images.append(image.flip(0) if self.input_format == "BGR" else image)
        return images

    def prepare_crops(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        mask_thr: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Stage 2: masked crops of all images.

        Args:
            images: B tensors (3, H_i, W_i) RGB 0-255. masks: B tensors (Q_i, H_i, W_i)
                probabilities. mask_thr: their binarisation threshold (None = the classifier's).

        Returns:
            crops (N, 3, S, S) normalised, crop masks (N, S, S) bool, and B valid flags (Q_i,) (N
            valid).
        """
        return self.crop_classifier.crop(images, masks, mask_thr=mask_thr)

    def prepare_crop_groups(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        mask_thr: Optional[float] = None,
    ) -> List[CropGroup]:
        """Stage 2 of "crops": the masked crops, one ``CropGroup`` per crop size. One group of
        every mask, unless ``full_size_crops`` K > 0 with a smaller crop size: then the K largest
        masks of each image are cropped at the CLIP's input size and the others at the smaller
        size.

        Args:
            images: B tensors (3, H_i, W_i) RGB 0-255. masks: B tensors (Q_i, H_i, W_i).
            mask_thr: MASK_THR (None = the classifier's).
        """
        classifier = self.crop_classifier
        thr = classifier.mask_thr if mask_thr is None else float(mask_thr)
        if self.full_size_crops == 0 or classifier.crop_size == self.full_crop_size:
            crops, crop_masks, valid = self.prepare_crops(images, masks, thr)
            selected = [torch.ones(m.shape[0], dtype=torch.bool, device=m.device) for m in masks]
            return [CropGroup(selected, crops, crop_masks, valid)]
        large = [largest_masks(m, thr, self.full_size_crops) for m in masks]
        groups = []
        for selected, size in (
            (large, self.full_crop_size),
            ([~g for g in large], classifier.crop_size),
        ):
            crops, crop_masks, valid = classifier.crop(
                images, [m[s] for m, s in zip(masks, selected)], size=size, mask_thr=thr
            )
            groups.append(CropGroup(selected, crops, crop_masks, valid))
        return groups

    def encode_crop_groups(
        self, groups: Sequence[CropGroup], masks: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stage 3 of "crops": the embeddings of every group, back in the order of ``masks``.

        Returns:
            as ``clip_embeddings``: (N, D) for the valid masks (image 0's first, each image in
            mask order) and B valid flags (Q_i,).
        """
        encoded = [self.encode_crops(g.crops, g.crop_masks) for g in groups]
        if len(groups) == 1:  # every mask in one group: already in order
            return encoded[0], list(groups[0].valid)
        embeds, valid_all, starts = [], [], [0] * len(groups)
        for i, m in enumerate(masks):
            rows = encoded[0].new_zeros((m.shape[0], encoded[0].shape[1]))
            valid = torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
            for j, (group, emb) in enumerate(zip(groups, encoded)):
                idx = group.selected[i].nonzero()[:, 0][group.valid[i]]
                rows[idx] = emb[starts[j] : starts[j] + idx.numel()]
                valid[idx] = True
                starts[j] += idx.numel()
            embeds.append(rows[valid])
            valid_all.append(valid)
        return torch.cat(embeds), valid_all

    def encode_crops(self, crops: torch.Tensor, crop_masks: torch.Tensor) -> torch.Tensor:
        """Stage 3: (N, 3, S, S) crops (+ masks for the mask prompts) → (N, D) normalised
        embeddings."""
        return self.crop_classifier.encode_crops(crops, crop_masks)

    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """Stage 4: (K, D) normalised class-name embeddings (cached per vocabulary)."""
        return self.crop_classifier.text_classifier(vocabulary)

    def clip_probabilities(
        self, crop_embeds: torch.Tensor, text: torch.Tensor, valid: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """p_clip per image: softmax_c(logit_scale · cos) for valid proposals, 1 for the others.

        Args:
            crop_embeds: (N, D) embeddings of the valid crops of all images (in order).
            text: (K, D). valid: B flags (Q_i,) with N True in total.

        Returns:
            B tensors (Q_i, K).
        """
        logits = self.crop_classifier.logit_scale * crop_embeds @ text.to(crop_embeds.dtype).t()
        out, start = [], 0
        for v in valid:
            full = logits.new_zeros((v.shape[0], text.shape[0]))
            n = int(v.sum())
            full[v] = logits[start : start + n]
            start += n
            out.append(clip_class_probs(full, v))
        return out

    def select_proposals(
        self, proposals: Proposals, min_objectness: Optional[float] = None
    ) -> Proposals:
        """Fast mode: drop the proposals of one image whose objectness is below
        ``min_objectness`` (None = the model's; the best one is kept)."""
        thr = self.min_objectness if min_objectness is None else float(min_objectness)
        if thr <= 0.0:
            return proposals
        keep = objectness_keep(proposals.scores, thr)
        return Proposals(
            proposals.masks[keep],
            proposals.scores[keep],
            None if proposals.class_probs is None else proposals.class_probs[keep],
        )

    def clip_embeddings(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        mask_thr: Optional[float] = None,
        timer: Optional[StageTimer] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stages 2-3 in the configured ``clip_mode`` (stages ``crop_prep`` and ``clip`` of
        ``timer``).

        Args:
            images: B tensors (3, H_i, W_i) RGB 0-255. masks: B tensors (Q_i, H_i, W_i).
            mask_thr: MASK_THR (None = the classifier's).

        Returns:
            (N, D) normalised embeddings of the valid masks of all images, and B valid flags (Q_i,)
            (N valid).
        """
        thr = self.crop_classifier.mask_thr if mask_thr is None else float(mask_thr)
        return CLIP_MODES[self.clip_mode](self, images, masks, thr, timer)

    def encode_single_pass(
        self,
        images: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        mask_thr: Optional[float] = None,
        timer: Optional[StageTimer] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stages 2-3 of "single_pass": one image-tower forward per image
        (``SinglePassMaskEmbedder``).

        Returns:
            as ``clip_embeddings``.
        """
        thr = self.crop_classifier.mask_thr if mask_thr is None else float(mask_thr)
        embeds, valid = [], []
        if timer is not None:
            timer.ms["crop_prep"].append(0.0)  # no crops in this mode
            timer.count("crops_by_size", {})
        with stage(timer, "clip"):
            for image, m in zip(images, masks):
                binary = m if m.dtype == torch.bool else m > thr
                v = binary.flatten(1).any(dim=1)
                valid.append(v)
                if bool(v.any()):
                    embeds.append(self.single_pass(normalize_clip(image), binary[v]))
        if not embeds:
            return images[0].new_zeros((0, self.crop_classifier.encoder.embed_dim)), valid
        return F.normalize(torch.cat(embeds), dim=-1), valid

    def encode_clip(
        self,
        images: Sequence[torch.Tensor],
        proposals: Sequence[Proposals],
        mask_thr: Optional[float] = None,
        timer: Optional[StageTimer] = None,
        duplicate_iou: Optional[float] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stages 2-3 for the proposals of B images: duplicate masks (``duplicate_iou``, None =
        the model's) are encoded once (stage ``select`` of ``timer``: the grouping).

        Returns:
            per image: (N_i, D) embeddings of its valid distinct masks, (Q_u,) valid flags of the
            distinct masks, (Q,) index of each proposal's distinct mask.
        """
        thr = self.crop_classifier.mask_thr if mask_thr is None else float(mask_thr)
        iou = self.duplicate_iou if duplicate_iou is None else float(duplicate_iou)
        with stage(timer, "select"):
            groups = [duplicate_representatives(p.masks, p.scores, thr, iou) for p in proposals]
        masks = [p.masks[unique] for p, (unique, _) in zip(proposals, groups)]
        embeds, valid = self.clip_embeddings(images, masks, thr, timer)
        if timer is not None:
            timer.count("masks_encoded", sum(int(u.numel()) for u, _ in groups))
            timer.count("crops_encoded", sum(int(v.sum()) for v in valid))
        out, start = [], 0
        for v, (_, inverse) in zip(valid, groups):
            n = int(v.sum())
            out.append((embeds[start : start + n], v, inverse))
            start += n
        return out

    def prepare_fast_modes(self) -> None:
        """Apply the module transforms of the fast modes once, at the first forward (quantized
        modules do not load float checkpoints, so every weight must be loaded before): the
        quantization of ``quantize`` and the channels-last proposal network."""
        if self._fast_prepared:
            return
        if self.quantize != "none" and self.device.type != "cpu":
            raise RuntimeError(
                f"MODEL.TWO_STAGE.FAST.QUANTIZE {self.quantize!r} runs on the CPU only"
            )
        QUANTIZERS[self.quantize](self.crop_classifier.clip.visual)
        if self.channels_last:  # the proposal network's convolutions, not the shared CLIP's
            convs_to_channels_last((self.proposal_source,), exclude=self.crop_classifier.clip)
        self._fast_prepared = True

    def fuse(
        self,
        proposals: Proposals,
        clip_probs: Optional[torch.Tensor],
        valid: Optional[torch.Tensor],
        output_size: Tuple[int, int],
        thing_ids: Sequence[int],
        ensemble_weight: Optional[float] = None,
        class_bias: Optional[torch.Tensor] = None,
        seen: Optional[torch.Tensor] = None,
        seen_ensemble_weight: Optional[float] = None,
    ) -> Dict[str, object]:
        """Stage 5: geometric ensemble, then the semantic / panoptic outputs of one image.

        Args:
            proposals: masks (Q, h, w) at the input size, scores, class probabilities.
            clip_probs: (Q, K) p_clip or None (λ = 0). valid: (Q,) or None (λ = 0).
            output_size: (height, width) of the outputs.
            thing_ids: thing classes (panoptic).
            ensemble_weight: λ (default: the model's).
            class_bias: (K,) seen-class calibration bias (``SeenCalibration.bias``) or None (off).
            seen: (K,) bool, the names the proposal head was trained on (``seen_mask``), or None.
            seen_ensemble_weight: λ_s of the ``seen`` names (None = λ).

        Returns:
            ``sem_seg`` (K, height, width) and / or ``panoptic_seg``.
        """
        weight = self.ensemble_weight if ensemble_weight is None else ensemble_weight
        probs, keep = geometric_ensemble(
            proposals.class_probs, clip_probs, valid, weight, seen, seen_ensemble_weight
        )
        probs = calibrate_query_probs(probs, class_bias)
        masks = proposals.masks
        out: Dict[str, object] = {}
        budget = self.output_budget
        resize = tuple(masks.shape[-2:]) != tuple(output_size)
        if self.semantic_on:
            out.update(self._semantic(probs, masks, keep, output_size, budget))
        if self.panoptic_on and not dense_fits(masks.shape[0], output_size, budget):
            out["panoptic_seg"] = resized_panoptic(
                panoptic_class_logits(probs, proposals.scores, keep),
                masks,
                output_size,
                thing_ids,
                self.object_mask_threshold,
                self.overlap_threshold,
                budget,
            )
        elif self.panoptic_on:
            if resize and masks.shape[0]:
                masks = F.interpolate(
                    masks[None], size=output_size, mode="bilinear", align_corners=False
                )[0]
            elif resize:
                masks = masks.new_zeros((0, *output_size))
            logits = panoptic_class_logits(probs, proposals.scores, keep)
            out["panoptic_seg"] = self.panoptic_merge(logits, masks, thing_ids)
        return out

    @staticmethod
    def _semantic(
        probs: torch.Tensor,
        masks: torch.Tensor,
        keep: Optional[torch.Tensor],
        output_size: Tuple[int, int],
        budget: int,
    ) -> Dict[str, object]:
        """``semantic_output`` of Σ_q p_q(c) · σ(m_q); when neither the (K, h, w) scores nor the
        (K, H, W) output fit in ``budget``, the scores are computed a chunk of classes at a time
        (``chunked_semantic_output``, same labels) and never held whole.

        With fewer kept masks than names (Q' < K) whose (Q', H, W) resize fits in ``budget``, the
        masks are resized to the output size first and combined there (MaskFormer's order, as
        ``ProposalMaskFormer.inference``): a bilinear resize is linear, so the scores are those of
        the resized (K, h, w) scores up to float rounding, at the cost of Q' resized maps, not K.
        """
        if probs.shape[0] != masks.shape[0]:
            raise ValueError(f"{probs.shape[0]} class rows but {masks.shape[0]} masks")
        if keep is not None:
            probs, masks = probs[keep], masks[keep]
        num, kept = probs.shape[1], masks.shape[0]
        output_size = (int(output_size[0]), int(output_size[1]))
        if (
            0 < kept < num
            and tuple(masks.shape[-2:]) != output_size
            and dense_fits(kept, output_size, budget)
        ):
            masks = F.interpolate(
                masks[None], size=output_size, mode="bilinear", align_corners=False
            )[0]
        size = tuple(masks.shape[-2:])
        if num == 0 or dense_fits(num, size, budget) or dense_fits(num, output_size, budget):
            return semantic_output(semantic_scores(probs, masks), output_size, budget)
        probs = probs.to(masks.dtype)

        def scores_of(start: int, stop: int) -> torch.Tensor:
            return torch.einsum("qc,qhw->chw", probs[:, start:stop], masks)

        return chunked_semantic_output(scores_of, num, size, output_size, budget)

    def panoptic_merge(
        self, class_logits: torch.Tensor, masks: torch.Tensor, thing_ids: Sequence[int]
    ):
        """The ``ProposalMaskFormer`` panoptic rules (object-mask and overlap thresholds, stuff
        merged per class) with this model's thresholds and the input's thing classes.

        Args:
            class_logits: (Q, K + 1) log-probabilities (``panoptic_class_logits``). masks: (Q, H,
                W).

        Returns:
            (panoptic_seg (H, W) int32, segments_info).
        """
        rules = _PanopticRules(set(thing_ids), self.object_mask_threshold, self.overlap_threshold)
        return ProposalMaskFormer.panoptic_inference(rules, class_logits, masks)

    # ------------------------------------------------------------------ forward
    def forward(
        self, batched_inputs: List[dict], options: Optional[InferenceOptions] = None
    ) -> List[dict]:
        """Per-image outputs (see the class docstring) under ``options`` (default: the config's).

        Raises:
            RuntimeError: in training mode (the stages are trained separately:
                ``ProposalMaskFormer`` and ``MaskAdaptedCLIP``).
        """
        if self.training:
            return self.losses(batched_inputs)
        self.prepare_fast_modes()
        # inference_mode: no autograd bookkeeping at all (the model is inference-only)
        with torch.inference_mode():
            return self.inference(batched_inputs, options)

    def losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """Never: the two stages train as their own models.

        Raises:
            RuntimeError: always, naming them.
        """
        raise RuntimeError(
            "TwoStageOVSeg is inference-only: train ProposalMaskFormer and MaskAdaptedCLIP "
            "separately, then evaluate with --eval-only"
        )

    def inference(
        self,
        batched_inputs: List[dict],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[dict]:
        """``predict(encode_inputs(...))``: all stages (timed into ``timer`` when given)."""
        options = self.resolve_options(options)
        return self.predict(self.encode_inputs(batched_inputs, timer, options), options, timer)

    @staticmethod
    def _clip_weights(options: InferenceOptions) -> Tuple[float, ...]:
        """The CLIP exponents the fusion of ``options`` uses: λ, and λ_s when set."""
        if options.seen_ensemble_weight is None:
            return (options.ensemble_weight,)
        return (options.ensemble_weight, options.seen_ensemble_weight)

    def uses_clip(self, options: InferenceOptions) -> bool:
        """Whether the fusion of ``options`` needs the CLIP branch (some exponent > 0)."""
        return max(self._clip_weights(options)) > 0.0

    def seen_mask(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K,) bool: the names of ``vocabulary`` the proposal head was trained on."""
        return torch.tensor([name in self.seen_names for name in vocabulary], dtype=torch.bool)

    def check_options(self, options: InferenceOptions) -> None:
        for name, weight in zip(("λ", "λ_s"), self._clip_weights(options)):
            if weight < 1.0 and not self.proposal_source.has_class_scores:
                raise ValueError(
                    f"ensemble weight {name} {weight} < 1 needs class scores from the "
                    f"proposal source, but {type(self.proposal_source).__name__} has none"
                )
        if options.seen_ensemble_weight is not None and not self.seen_names:
            raise ValueError(
                "a seen-class ensemble weight needs the names the proposal head was trained on "
                "(MODEL.SEEN_CALIBRATION.SEEN_NAMES or seen_classes metadata)"
            )

    def encode_proposals(
        self,
        batched_inputs: Sequence[dict],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[TwoStageEncoding]:
        """Stage 1 and the objectness skip, inputs grouped by vocabulary (stages ``proposals``
        and ``select`` of ``timer``): encodings without CLIP embeddings (``encode_clip_inputs``
        adds them)."""
        options = self.resolve_options(options)
        if not batched_inputs:
            raise ValueError("TwoStageOVSeg got an empty batch")
        groups: Dict[Tuple[str, ...], List[int]] = {}
        for i, x in enumerate(batched_inputs):
            groups.setdefault(tuple(self.vocabulary(x, options)), []).append(i)
        out: List[Optional[TwoStageEncoding]] = [None] * len(batched_inputs)
        for vocabulary, idx in groups.items():
            inputs = [batched_inputs[i] for i in idx]
            with stage(timer, "proposals"):
                proposals = self.generate_proposals(inputs, list(vocabulary))
            with stage(timer, "select"):
                proposals = [
                    self.select_proposals(p, options.fast.min_objectness) for p in proposals
                ]
            for i, p in zip(idx, proposals):
                out[i] = TwoStageEncoding(batched_inputs[i], vocabulary, p, options.mask_thr)
        if timer is not None:
            timer.count("proposals_kept", sum(int(e.proposals.masks.shape[0]) for e in out))
        return out

    def encode_clip_inputs(
        self,
        encoded: Sequence[TwoStageEncoding],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[TwoStageEncoding]:
        """Stages 2-3 on proposal encodings, with MASK_THR of ``options``."""
        options = self.resolve_options(options)
        images = self.rgb_images([e.input for e in encoded])
        proposals = [e.proposals for e in encoded]
        clip = self.encode_clip(
            images, proposals, options.mask_thr, timer, options.fast.duplicate_iou
        )
        return [
            e._replace(mask_thr=options.mask_thr, clip_embeds=c, valid=v, inverse=inv)
            for e, (c, v, inv) in zip(encoded, clip)
        ]

    def encode_inputs(
        self,
        batched_inputs: Sequence[dict],
        timer: Optional[StageTimer] = None,
        options: Optional[InferenceOptions] = None,
    ) -> List[TwoStageEncoding]:
        """Stages 1-3: proposals, and CLIP embeddings of their masks when a CLIP exponent of
        ``options`` (λ, or λ_s when set) is > 0.
        The encoding is bound to the vocabulary and MASK_THR of ``options``; ``predict`` scores
        it under any λ and γ."""
        options = self.resolve_options(options)
        encoded = self.encode_proposals(batched_inputs, options, timer)
        if self.uses_clip(options):
            encoded = self.encode_clip_inputs(encoded, options, timer)
        return encoded

    def clip_probs(
        self, encoded: TwoStageEncoding, text: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """p_clip (Q, K) of every proposal of one encoding and its (Q,) valid flags."""
        probs = self.clip_probabilities(encoded.clip_embeds, text, [encoded.valid])[0]
        return probs[encoded.inverse], encoded.valid[encoded.inverse]

    def predict(
        self,
        encoded: Sequence[TwoStageEncoding],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[dict]:
        """Stages 4-5 of encoded inputs under λ and γ of ``options`` (stages ``text`` and
        ``fusion`` of ``timer``).

        Raises:
            ValueError: ``options`` name another vocabulary or MASK_THR than the encoding's, or
                a CLIP exponent > 0 (λ or λ_s) for an encoding without CLIP embeddings.
        """
        options = self.resolve_options(options)
        self.check_options(options)
        results = []
        for e in encoded:
            vocabulary = list(e.vocabulary)
            if options.vocabulary is not None and (
                tuple(self.vocabulary(e.input, options)) != e.vocabulary
            ):
                raise ValueError("the options' vocabulary differs from the encoded one")
            text = None
            if self.uses_clip(options):
                if e.clip_embeds is None:
                    raise ValueError(
                        "a CLIP exponent > 0 (λ or λ_s) needs an encoding with CLIP embeddings "
                        "(encode_inputs or encode_clip_inputs)"
                    )
                if options.mask_thr != e.mask_thr:
                    raise ValueError(
                        f"MASK_THR {options.mask_thr} of the options, {e.mask_thr} of the encoding"
                    )
                with stage(timer, "text"):
                    text = self.text_embeddings(vocabulary)
            calibration = self.calibration(options)
            bias = calibration.bias(vocabulary, self.device) if calibration.enabled else None
            size = tuple(e.input["image"].shape[-2:])
            output_size = (int(e.input.get("height", size[0])), int(e.input.get("width", size[1])))
            thing_ids = self.thing_ids_for(e.input, vocabulary)
            with stage(timer, "fusion"):
                clip_probs, valid = (None, None) if text is None else self.clip_probs(e, text)
                r = self.fuse(
                    e.proposals,
                    clip_probs,
                    valid,
                    output_size,
                    thing_ids,
                    ensemble_weight=options.ensemble_weight,
                    class_bias=bias,
                    seen=(
                        None if options.seen_ensemble_weight is None else self.seen_mask(vocabulary)
                    ),
                    seen_ensemble_weight=options.seen_ensemble_weight,
                )
            r["vocabulary"] = vocabulary
            results.append(r)
        return results


def _encode_crops(model: TwoStageOVSeg, images, masks, mask_thr: float, timer=None):
    """The "crops" CLIP mode: one masked crop per mask (shapes: ``clip_embeddings``); stages
    ``crop_prep`` and ``clip`` of ``timer``, and the crops per size."""
    with stage(timer, "crop_prep"):
        groups = model.prepare_crop_groups(images, masks, mask_thr)
    with stage(timer, "clip"):
        out = model.encode_crop_groups(groups, masks)
    if timer is not None:
        sizes: Dict[int, int] = {}
        for g in groups:
            sizes[int(g.crops.shape[-1])] = sizes.get(int(g.crops.shape[-1]), 0) + g.crops.shape[0]
        timer.count("crops_by_size", sizes)
    return out


# MODEL.TWO_STAGE.FAST.CLIP_MODE -> fn(model, images, masks, mask_thr, timer) -> (embeds (N, D),
# valid flags)
CLIP_MODES = {"crops": _encode_crops, "single_pass": TwoStageOVSeg.encode_single_pass}

# MODEL.TWO_STAGE.FAST.QUANTIZE -> in-place transform of the CLIP image tower
QUANTIZERS = {"none": lambda visual: visual, "int8_dynamic": quantize_vision_linears}


class _PanopticRules:
    """The attributes ``ProposalMaskFormer.panoptic_inference`` reads from its model."""

    def __init__(self, thing_ids, object_mask_threshold: float, overlap_threshold: float):
        self.thing_ids = thing_ids
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
