"""``CLIPPretrain``: image-caption contrastive training of an open_clip model (from scratch or
fine-tuning).

Training (a caption dataset, ``INPUT.DATASET_MAPPER_NAME caption``): one caption per image, drawn at
    random,
and, with ``HARD_NEGATIVES``, its hard-negative caption as an extra text negative for every image::

    L = ½ [ CE(s · I Tᵀ, diag) + CE(s · T Iᵀ, diag) ]      I (B, D) images, T (B, D) captions (+
    negatives)

with the learnable logit scale s = exp(t) clamped at ``LOGIT_SCALE_MAX``. Two captions of a batch
that say the same thing (``FALSE_NEGATIVES``: the same content under the training datasets'
``caption_templates``, or the same text) are no negatives of each other, nor is another pair's hard
negative that says what an image's caption says
(:class:`ov_seg.data.caption_content.CaptionContent`). Evaluation
(``INPUT.TEST_DATASET_MAPPER_NAME mask_category``, ``TEST.EVALUATOR_TYPE mask_classification``):
zero-shot masked-crop classification of ground-truth segments against the dataset's class names.

The state dict is the open_clip model's under ``clip.``, so ``model_final.pth`` already loads with
``build_clip(name, path)``; ``export_clip`` writes the plain ``clip_export.pth``.
"""

import logging
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from ov_seg.data.caption_content import CaptionContent
from ov_seg.modeling.clip import (
    MaskedCropClassifier,
    build_clip_from_cfg,
    build_tokenizer,
    clip_sizes,
    install_compact_vocabulary,
    normalize_clip,
    resize_center_crop,
    save_clip_checkpoint,
)
from ov_seg.modeling.clip.text_classifier import text_tower_parameters
from ov_seg.modeling.losses.contrastive import clamped_logit_scale, info_nce
from ov_seg.modeling.losses.hard_negative import same_text_matrix

__all__ = ["CLIPPretrain", "caption_texts", "caption_templates"]

FALSE_NEGATIVE_MODES = ("none", "exact", "content")

logger = logging.getLogger(__name__)


def caption_texts(dataset_names) -> List[str]:
    """Every caption and hard-negative caption of the registered datasets ``dataset_names``."""
    texts: List[str] = []
    for name in dataset_names:
        for d in DatasetCatalog.get(name):
            caps = d.get("captions") or []
            texts.extend([caps] if isinstance(caps, str) else caps)
            texts.extend(d.get("hard_negatives") or [])
    return texts


def caption_templates(dataset_names) -> List[str]:
    """The ``caption_templates`` of the datasets' metadata (format strings such as ``"a photo of
    {L}"``), in order, without repeats; empty when none has any."""
    templates: List[str] = []
    for name in dataset_names:
        templates.extend(MetadataCatalog.get(name).get("caption_templates", None) or [])
    return list(dict.fromkeys(templates))


@META_ARCH_REGISTRY.register()
class CLIPPretrain(nn.Module):
    """Contrastive image-caption training of an open_clip ``CLIP``.

    Args:
        clip_model: the open_clip model (registered as ``clip``; both towers train unless
            ``lock_text``).
        tokenizer: its ``CLIPTokenizer``.
        crop_classifier: a ``MaskedCropClassifier`` referencing ``clip_model``
            (``register_clip=False``, no prompts) for the zero-shot evaluation.
        hard_negatives: use the inputs' ``hard_negatives`` as extra text negatives.
        logit_scale_max: clamp of exp(t).
        lock_text: freeze the text tower.
        false_negatives: which texts are no negatives of an image: other captions and other pairs'
            hard negatives that say what its caption says, by ``"content"`` (the same
            :class:`CaptionContent` key under ``templates``) or ``"exact"`` (the same normalised
            text); ``"none"`` (CLIP): every other text is a negative.
        templates: the training captions' templates (``"content"`` only).
    """

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        tokenizer,
        crop_classifier: MaskedCropClassifier,
        hard_negatives: bool = True,
        logit_scale_max: float = 100.0,
        lock_text: bool = False,
        false_negatives: str = "content",
        templates: Sequence[str] = (),
    ):
        super().__init__()
        if false_negatives not in FALSE_NEGATIVE_MODES:
            raise ValueError(
                f"MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES must be one of {FALSE_NEGATIVE_MODES}, got "
                f"{false_negatives!r}"
            )
        self.false_negatives = false_negatives
        self.caption_content = CaptionContent(templates if false_negatives == "content" else ())
        if false_negatives == "content" and not templates:
            logger.info(
                "MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES 'content': the training datasets have no "
                "'caption_templates' metadata; captions with the same text are no negatives"
            )
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.crop_classifier = crop_classifier
        self.hard_negatives = bool(hard_negatives)
        self.logit_scale_max = float(logit_scale_max)
        self.image_size = clip_sizes(clip_model).image_size
        for p in self.clip.parameters():
            p.requires_grad_(True)
        if lock_text:
            for p in text_tower_parameters(self.clip):
                p.requires_grad_(False)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        ccfg = cfg.MODEL.CLIP
        clip_model = build_clip_from_cfg(cfg)
        tokenizer = build_tokenizer(clip_model, ccfg.MODEL_NAME)
        if ccfg.COMPACT_VOCAB:
            texts = caption_texts(cfg.DATASETS.TRAIN)
            emb = install_compact_vocabulary(clip_model, tokenizer, texts)
            logger.info(
                "compact text vocabulary: %d of %d token ids train (%d training texts)",
                emb.token_ids.numel(),
                emb.num_embeddings,
                len(texts),
            )
        clf = MaskedCropClassifier.from_config(cfg, clip_model=clip_model)
        clf.update(register_clip=False, prompt_depth=0, prompts=None)
        return {
            "clip_model": clip_model,
            "tokenizer": tokenizer,
            "crop_classifier": MaskedCropClassifier(**clf),
            "hard_negatives": cfg.MODEL.CLIP_PRETRAIN.HARD_NEGATIVES,
            "logit_scale_max": cfg.MODEL.CLIP_PRETRAIN.LOGIT_SCALE_MAX,
            "lock_text": cfg.MODEL.CLIP_PRETRAIN.LOCK_TEXT,
            "false_negatives": cfg.MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES,
            "templates": caption_templates(cfg.DATASETS.TRAIN),
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def train(self, mode: bool = True):
        # the text tower changes while training: classifier embeddings must be recomputed
        self.crop_classifier.text_classifier.clear_cache()
        return super().train(mode)

    def preprocess_images(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """(B, 3, S, S) normalised CLIP inputs (shortest side resized to S, centre crop)."""
        images = [
            resize_center_crop(x["image"].to(self.device), self.image_size) for x in batched_inputs
        ]
        return normalize_clip(torch.stack(images))

    def _texts(self, batched_inputs: List[Dict]):
        captions, negatives = [], []
        for i, x in enumerate(batched_inputs):
            caps = x.get("captions")
            caps = [caps] if isinstance(caps, str) else list(caps or [])
            if not caps:
                raise ValueError(
                    f"training input {i} ({x.get('file_name', x.get('image_id'))}) has no "
                    "'captions': train CLIPPretrain on a caption dataset with "
                    "INPUT.DATASET_MAPPER_NAME caption"
                )
            k = int(torch.randint(len(caps), ()))
            captions.append(caps[k])
            hard = list(x.get("hard_negatives") or [])
            if self.hard_negatives and hard:
                negatives.append(
                    hard[k] if len(hard) == len(caps) else hard[int(torch.randint(len(hard), ()))]
                )
        return captions, negatives

    def same_content(self, captions: List[str], negatives: Sequence[str] = ()):
        """Which pairs say the same thing (``false_negatives``), or None for "none".

        Returns:
            ((B, B) bool over the captions, (B, M) bool: negative m says what caption i says).
        """
        if self.false_negatives == "none":
            return None, None
        keys = self.caption_content.keys(captions)
        same = same_text_matrix(keys, device=self.device)
        if not negatives:
            return same, None
        return same, same_text_matrix(keys, self.caption_content.keys(negatives), self.device)

    def forward(self, batched_inputs: List[Dict]):
        """Training: ``{"loss_contrastive": L}``; eval: ``mask_cls`` outputs (crop classifier)."""
        if not self.training:
            return self.crop_classifier.classify_inputs(batched_inputs)
        images = self.preprocess_images(batched_inputs)
        captions, negatives = self._texts(batched_inputs)
        image_emb = self.clip.encode_image(images)
        text_emb = self.clip.encode_text(self.tokenizer(captions + negatives).to(self.device))
        b = len(captions)
        scale = clamped_logit_scale(self.clip.logit_scale, self.logit_scale_max)
        same, same_negatives = self.same_content(captions, negatives)
        loss = info_nce(
            image_emb,
            text_emb[:b],
            scale,
            b_negatives=text_emb[b:] if negatives else None,
            same=same,
            same_negatives=same_negatives,
        )
        storage = get_event_storage()
        storage.put_scalar("logit_scale", float(scale.detach()), smoothing_hint=False)
        if same is not None:
            # texts per image that say what its caption says (left out of its negatives): other
            # captions, then other pairs' hard negatives
            count = same.sum() - b + (same_negatives.sum() if same_negatives is not None else 0)
            storage.put_scalar("false_negatives", float(count) / b)
        return {"loss_contrastive": loss}

    def export_clip(self, path: str) -> None:
        """Write the trained CLIP as a plain open_clip checkpoint (``build_clip(name, path)``)."""
        save_clip_checkpoint(path, self.clip, meta={"source": type(self).__name__})
