"""``ProposalMaskFormer``: the MaskFormer proposal generator of two-stage OVSeg."""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from ov_seg.modeling.criterion import SetCriterion
from ov_seg.modeling.heads.class_heads import build_class_head
from ov_seg.modeling.matcher import HungarianMatcher
from ov_seg.modeling.pixel_decoder import build_image_skip, build_pixel_decoder
from ov_seg.modeling.postprocess import panoptic_segments
from ov_seg.modeling.transformer_decoder import build_transformer_decoder
from ov_seg.utils.memory_format import convs_to_channels_last

__all__ = ["ProposalMaskFormer", "PROPOSAL_SCORES"]


def _class_score(mask_cls: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 − p(no object). mask_cls: (Q, K + 1) logits; masks: (Q, H, W) probabilities (unused)."""
    return 1 - mask_cls.softmax(-1)[:, -1]


def _class_x_mask_score(mask_cls: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(1 − p(no object)) × mean probability inside the binarised mask (Mask2Former's score)."""
    binary = (masks > 0.5).to(masks.dtype)
    mask_score = (masks * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return _class_score(mask_cls, masks) * mask_score


# MODEL.MASK_FORMER.TEST.PROPOSAL_SCORE -> score(mask_cls (Q, K + 1), masks (Q, H, W)) -> (Q,)
PROPOSAL_SCORES = {"class": _class_score, "class_x_mask": _class_x_mask_score}


@META_ARCH_REGISTRY.register()
class ProposalMaskFormer(nn.Module):
    """MaskFormer (mask classification) producing N mask proposals per image with class / objectness
    scores: backbone → pixel decoder (per-pixel embeddings at stride 4) → transformer decoder (N
    queries, one mask per query) → class head (open-vocabulary or class-agnostic).

    Input (``batched_inputs``: list of dicts from a dataset mapper): ``image`` (3, H, W) in
    ``INPUT.FORMAT``; optional ``height``/``width`` (output size, default the input size);
    ``instances`` (training) with ``gt_classes`` (N,) and ``gt_masks`` (N, H, W) (BitMasks or
    tensor); optional ``vocabulary`` (class names for the open-vocabulary head; default: the
    training dataset's).

    Output in training: a dict of weighted losses (``SetCriterion``). In inference: per image a dict
    with ``sem_seg`` (K, height, width) class probabilities, ``panoptic_seg`` (``(H, W)`` int32
    segment ids, ``segments_info``) and ``proposals`` (see ``predict_proposals``), each when its
    TEST flag is on.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        class_head: nn.Module,
        criterion: SetCriterion,
        transformer_in_feature: str,
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        vocabulary: Sequence[str] = (),
        thing_ids: Sequence[int] = (),
        semantic_on: bool = True,
        panoptic_on: bool = False,
        proposals_on: bool = True,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        proposal_score: str = "class",
        image_skip: Optional[nn.Module] = None,
        channels_last: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 ``Backbone``.
            pixel_decoder: ``forward_features(features) -> (mask_features, encoder_features)``.
            transformer_decoder: ``(memory, mask_features) -> {"query_embeds", "pred_masks"}``.
            class_head: ``(query_embeds, vocabulary) -> logits (..., Q, K + 1)``.
            criterion: the set criterion (holds the matcher).
            transformer_in_feature: memory of the decoder: a backbone feature name or
                "transformer_encoder" (the pixel decoder's encoder output).
            size_divisibility: pad batched images to a multiple of this; <= 0: the backbone's
                ``size_divisibility`` (INPUT.SIZE_DIVISIBILITY -1).
            pixel_mean, pixel_std: per-channel normalisation (3 values each, ``INPUT.FORMAT``
                order).
            vocabulary: class names used when an input has no ``vocabulary`` (open-vocabulary head).
            thing_ids: class ids that are things (panoptic inference; others are merged as stuff).
            semantic_on, panoptic_on, proposals_on: inference outputs.
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            proposal_score: key of ``PROPOSAL_SCORES``.
            image_skip: ``(mask_features, images) -> finer mask_features``
                (``ImageGuidedMaskFeatures``) or None (masks at the pixel decoder's stride 4).
            channels_last: keep the convolution weights of the backbone, pixel decoder and image
                branch, and the input images, in the channels-last memory format (faster on CPUs
                with oneDNN); the class head's CLIP is left as it is.
        """
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean / pixel_std need 3 values, got {pixel_mean}, {pixel_std}")
        if proposal_score not in PROPOSAL_SCORES:
            raise KeyError(
                f"unknown proposal score {proposal_score!r}; known: {sorted(PROPOSAL_SCORES)}"
            )
        if getattr(class_head, "class_agnostic", False) and (semantic_on or panoptic_on):
            raise ValueError(
                "the class-agnostic head predicts no categories: set "
                "MODEL.MASK_FORMER.TEST.SEMANTIC_ON and PANOPTIC_ON to False (proposals only)"
            )
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.class_head = class_head
        self.criterion = criterion
        self.transformer_in_feature = transformer_in_feature
        if size_divisibility <= 0:
            size_divisibility = getattr(backbone, "size_divisibility", 0)
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.vocabulary = list(vocabulary)
        self.thing_ids = set(int(i) for i in thing_ids)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.proposals_on = proposals_on
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.proposal_score = proposal_score
        self.image_skip = image_skip
        self.channels_last = bool(channels_last)
        if self.channels_last:
            convs_to_channels_last((backbone, pixel_decoder, image_skip))

    @classmethod
    def from_config(cls, cfg, clip_model: Optional[nn.Module] = None):
        """Arguments from ``cfg``; ``clip_model``: an open_clip model to share with the
        open-vocabulary class head (default: the head builds ``MODEL.CLIP``'s)."""
        m = cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if m.TRANSFORMER_IN_FEATURE == "transformer_encoder":
            in_channels = cfg.MODEL.PIXEL_DECODER.CONVS_DIM
        elif m.TRANSFORMER_IN_FEATURE in shapes:
            in_channels = shapes[m.TRANSFORMER_IN_FEATURE].channels
        else:
            raise KeyError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE {m.TRANSFORMER_IN_FEATURE!r} is neither "
                f"'transformer_encoder' nor a backbone feature ({sorted(shapes)})"
            )
        matcher = HungarianMatcher(
            cost_class=m.CLASS_WEIGHT,
            cost_focal=m.MASK_WEIGHT,
            cost_dice=m.DICE_WEIGHT,
            num_points=m.TRAIN_NUM_POINTS,
            focal_alpha=m.FOCAL_ALPHA,
            focal_gamma=m.FOCAL_GAMMA,
        )
        criterion = SetCriterion(
            matcher=matcher,
            class_weight=m.CLASS_WEIGHT,
            mask_weight=m.MASK_WEIGHT,
            dice_weight=m.DICE_WEIGHT,
            no_object_weight=m.NO_OBJECT_WEIGHT,
            focal_alpha=m.FOCAL_ALPHA,
            focal_gamma=m.FOCAL_GAMMA,
            num_points=m.TRAIN_NUM_POINTS,
            oversample_ratio=m.OVERSAMPLE_RATIO,
            importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
            loss_at_target_size=m.MASK_LOSS_AT_TARGET_SIZE,
        )
        train_meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        test_meta = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        thing_map = test_meta.get("thing_dataset_id_to_contiguous_id", {}) if test_meta else {}
        return {
            "backbone": backbone,
            "pixel_decoder": build_pixel_decoder(cfg, shapes),
            "transformer_decoder": build_transformer_decoder(cfg, in_channels),
            "class_head": build_class_head(cfg, clip_model),
            "criterion": criterion,
            "transformer_in_feature": m.TRANSFORMER_IN_FEATURE,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "vocabulary": train_meta.get("stuff_classes", []) if train_meta else [],
            "thing_ids": list(thing_map.values()),
            "semantic_on": m.TEST.SEMANTIC_ON,
            "panoptic_on": m.TEST.PANOPTIC_ON,
            "proposals_on": m.TEST.PROPOSALS_ON,
            "object_mask_threshold": m.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": m.TEST.OVERLAP_THRESHOLD,
            "proposal_score": m.TEST.PROPOSAL_SCORE,
            "image_skip": build_image_skip(cfg),
            "channels_last": m.CHANNELS_LAST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise and pad the images of a batch (ImageList of (B, 3, H_pad, W_pad))."""
        if not batched_inputs:
            raise ValueError("ProposalMaskFormer got an empty batch")
        images = []
        for x in batched_inputs:
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
                raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
            images.append((image.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def batch_vocabulary(self, batched_inputs: List[dict]) -> List[str]:
        """The class names of the batch: the inputs' ``vocabulary`` (all equal) or the default
        one."""
        vocabs = {tuple(x["vocabulary"]) for x in batched_inputs if x.get("vocabulary")}
        if len(vocabs) > 1:
            raise ValueError("all images of a batch must share one vocabulary")
        return list(vocabs.pop()) if vocabs else self.vocabulary

    def prepare_targets(
        self, batched_inputs: List[dict], images: ImageList, vocabulary
    ) -> List[dict]:
        """Per image ``labels`` (N,) and ``masks`` (N, H_pad, W_pad) bool, padded like the
        images."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise KeyError(
                    "training ProposalMaskFormer needs per-segment 'instances' in each input "
                    "(INPUT.DATASET_MAPPER_NAME 'panoptic')"
                )
            inst = x["instances"].to(self.device)
            masks = getattr(inst.gt_masks, "tensor", inst.gt_masks)
            padded = torch.zeros(
                (masks.shape[0], h_pad, w_pad), dtype=torch.bool, device=self.device
            )
            padded[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
            labels = self.class_head.training_labels(inst.gt_classes.long(), vocabulary)
            targets.append({"labels": labels, "masks": padded})
        return targets

    # ------------------------------------------------------------------ network
    def forward_outputs(
        self, images: torch.Tensor, vocabulary: Sequence[str]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H_pad, W_pad) normalised, padded images.
            vocabulary: class names for the class head.

        Returns:
            ``pred_logits`` (L, B, Q, K + 1), ``pred_masks`` (L, B, Q, H_pad / s, W_pad / s) logits
            (s = 4, or ``MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE``) and ``query_embeds`` (L, B, Q,
            d), for L supervised decoder layers (the last is the output).
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        mask_features, encoder_features = self.pixel_decoder.forward_features(features)
        if self.image_skip is not None:
            mask_features = self.image_skip(mask_features, images)
        if self.transformer_in_feature == "transformer_encoder":
            if encoder_features is None:
                raise ValueError(
                    "TRANSFORMER_IN_FEATURE 'transformer_encoder' needs a pixel decoder with an "
                    "encoder (MODEL.PIXEL_DECODER.NAME 'TransformerEncoderPixelDecoder')"
                )
            memory = encoder_features
        else:
            memory = features[self.transformer_in_feature]
        out = self.transformer_decoder(memory, mask_features)
        out["pred_logits"] = self.class_head(out["query_embeds"], vocabulary)
        return out

    def forward(self, batched_inputs: List[dict]):
        """Losses (training) or per-image results (inference); see the class docstring."""
        images = self.preprocess_image(batched_inputs)
        vocabulary = self.batch_vocabulary(batched_inputs)
        outputs = self.forward_outputs(images.tensor, vocabulary)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images, vocabulary)
            return self.criterion(outputs, targets)
        return self.inference(batched_inputs, images, outputs)

    # ------------------------------------------------------------------ inference
    def _image_masks(
        self, mask_pred: torch.Tensor, images: ImageList, i: int, height: int, width: int
    ):
        """Mask logits (Q, h, w) of image i → (Q, height, width): upsample to the padded size, crop
        the image, resize to the output size."""
        up = F.interpolate(
            mask_pred[None], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        return sem_seg_postprocess(up[0], images.image_sizes[i], height, width)

    def inference(
        self, batched_inputs: List[dict], images: ImageList, outputs: Dict[str, torch.Tensor]
    ):
        results = []
        pred_logits, pred_masks = outputs["pred_logits"][-1], outputs["pred_masks"][-1]
        for i, x in enumerate(batched_inputs):
            height = x.get("height", images.image_sizes[i][0])
            width = x.get("width", images.image_sizes[i][1])
            mask_cls = pred_logits[i].float()
            masks = self._image_masks(pred_masks[i].float(), images, i, height, width).sigmoid()
            r = {}
            if self.semantic_on:
                r["sem_seg"] = self.semantic_inference(mask_cls, masks)
            if self.panoptic_on:
                r["panoptic_seg"] = self.panoptic_inference(mask_cls, masks)
            if self.proposals_on:
                r["proposals"] = self._proposals(mask_cls, masks, outputs["query_embeds"][-1, i])
            results.append(r)
        return results

    def _proposals(
        self, mask_cls: torch.Tensor, masks: torch.Tensor, query_embeds: torch.Tensor
    ) -> dict:
        return {
            "masks": masks,
            "scores": PROPOSAL_SCORES[self.proposal_score](mask_cls, masks),
            "class_logits": mask_cls,
            "query_embeds": query_embeds,
        }

    @torch.no_grad()
    def predict_proposals(self, batched_inputs: List[dict]) -> List[dict]:
        """Raw proposals for the second stage and caption mining (call ``eval()`` first for dropout
        off).

        Args:
            batched_inputs: as for ``forward`` (``image``, optional
                ``height``/``width``/``vocabulary``).

        Returns:
            per image a dict with
            ``masks`` (Q, height, width) float mask probabilities σ(m_q) at the output size;
            ``scores`` (Q,) proposal scores (MODEL.MASK_FORMER.TEST.PROPOSAL_SCORE; "class" = 1 −
            p(no object), the objectness of the class-agnostic head);
            ``class_logits`` (Q, K + 1) logits of the class head (last column: no object);
            ``query_embeds`` (Q, d) final decoder outputs.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.forward_outputs(images.tensor, self.batch_vocabulary(batched_inputs))
        proposals = []
        for i, x in enumerate(batched_inputs):
            height = x.get("height", images.image_sizes[i][0])
            width = x.get("width", images.image_sizes[i][1])
            masks = self._image_masks(
                outputs["pred_masks"][-1, i].float(), images, i, height, width
            )
            mask_cls = outputs["pred_logits"][-1, i].float()
            proposals.append(
                self._proposals(mask_cls, masks.sigmoid(), outputs["query_embeds"][-1, i])
            )
        return proposals

    @staticmethod
    def semantic_inference(mask_cls: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """semseg[c] = Σ_q softmax(mask_cls_q)[c] · σ(m_q), no-object column dropped after the
        softmax.

        Args:
            mask_cls: (Q, K + 1) logits. masks: (Q, H, W) probabilities.

        Returns:
            (K, H, W) scores.
        """
        probs = mask_cls.softmax(-1)[:, :-1]
        return torch.einsum("qc,qhw->chw", probs, masks)

    def panoptic_inference(self, mask_cls: torch.Tensor, masks: torch.Tensor):
        """MaskFormer panoptic rules. mask_cls: (Q, K + 1) logits. masks: (Q, H, W) probabilities.

        Keep queries whose best class is not "no object" and whose score exceeds the object-mask
        threshold; each pixel goes to argmax_q score_q · σ(m_q); a query whose kept area / (σ(m_q) ≥
        0.5 area) is below the overlap threshold is dropped; stuff segments of the same class are
        merged.

        Returns:
            (panoptic_seg (H, W) int32 with 0 = void, segments_info list of dicts with ``id``,
            ``isthing``, ``category_id``).
        """
        scores, labels = mask_cls.softmax(-1).max(-1)
        num_classes = mask_cls.shape[-1] - 1
        keep = labels.ne(num_classes) & (scores > self.object_mask_threshold)
        scores, labels, masks = scores[keep], labels[keep], masks[keep]
        h, w = masks.shape[-2:]
        panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
        segments_info = []
        if masks.shape[0] == 0:
            return panoptic_seg, segments_info
        owner = (scores[:, None, None] * masks).argmax(0)
        own = masks >= 0.5
        owned = own.gather(0, owner[None])[0]  # the owner's own mask covers the pixel
        segment_of, segments_info = panoptic_segments(
            labels,
            own.flatten(1).sum(1),
            torch.bincount(owner[owned], minlength=masks.shape[0]),
            self.thing_ids,
            self.overlap_threshold,
        )
        panoptic_seg = torch.where(owned, segment_of[owner], panoptic_seg)
        return panoptic_seg, segments_info
