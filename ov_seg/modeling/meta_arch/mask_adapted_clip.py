"""``MaskAdaptedCLIP``: adapt CLIP to masked crops on (mask, category name) pairs (OVSeg).

Each pair's masked crop goes through the image tower (with mask prompts). Two training losses
(``MODEL.MASK_ADAPTED_CLIP.LOSS``):

- "ovseg", OVSeg's recipe (its open_clip fine-tuning): each pair i has the text
  t_i = a random template of ``MODEL.CLIP.TEMPLATES`` filled with its name, and CLIP's symmetric
  contrastive loss over the N pairs of the step with the CLIP's own learnable logit scale
  s = exp(logit_scale) (clamped to 100)::

      L = ½ [ CE(s · V Tᵀ, i) + CE(s · T Vᵀ, i) ]      V, T: (N, D) L2-normalised

  pairs of the same name are negatives of each other, as in OVSeg (``SAME_NAME_NEGATIVES``; False
  leaves them out of each other's negatives: with a few dozen names a step of a hundred pairs holds
  several pairs of one name, and OVSeg's loss pushes them apart). Crops get a random-resized crop
  (``RRC_SCALE``, OVSeg: area 0.9-1.0).
- "classification": cross-entropy of each crop against the prompt-ensembled embeddings of the
  batch's unique names (or the whole training vocabulary) with the fixed scale
  s = ``MODEL.CLIP.LOGIT_SCALE``::

      L = CE(s · cos(f_v(crop_i, mask_i), f_t(names)), name_i)

Modes (``MODEL.MASK_ADAPTED_CLIP.MODE``): "mpt" trains only the mask prompts (every CLIP weight
frozen), "ft" the image tower (no prompts), "ft_mpt" both; the text tower is always frozen (the
"ovseg" loss also trains the logit scale). FT then MPT is an "ft" run followed by an "mpt" run from
its export. Evaluation: masked-crop classification of ground-truth segments (``mask_category``
mapper, ``mask_classification`` evaluator).
"""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from ov_seg.modeling.clip import (
    MaskedCropClassifier,
    build_clip_from_cfg,
    jitter_masks,
    random_resized_crop,
    save_clip_checkpoint,
)
from ov_seg.modeling.losses.contrastive import (
    clamped_logit_scale,
    contrastive_classification,
    info_nce,
)
from ov_seg.modeling.losses.hard_negative import same_text_matrix

__all__ = ["MaskAdaptedCLIP", "MODES", "LOSSES"]

# mode -> (image tower trains, mask prompts train)
MODES = {"mpt": (False, True), "ft": (True, False), "ft_mpt": (True, True)}
# MODEL.MASK_ADAPTED_CLIP.LOSS values (see the module docstring)
LOSSES = ("ovseg", "classification")


@META_ARCH_REGISTRY.register()
class MaskAdaptedCLIP(nn.Module):
    """Mask-category contrastive adaptation of an open_clip model.

    Args:
        clip_model: the open_clip model (registered as ``clip``).
        crop_classifier: a ``MaskedCropClassifier`` referencing ``clip_model``
            (``register_clip=False``); holds the mask prompts (depth 0 in "ft" mode).
        mode: "mpt", "ft" or "ft_mpt" (see ``MODES``).
        vocabulary: "batch" (the batch's category names) or "dataset" (``dataset_vocabulary``, plus
            any batch name outside it).
        dataset_vocabulary: class names of the training dataset (for ``vocabulary="dataset"``).
        mask_jitter: training masks are dilated / eroded by up to this many pixels.
        max_crops: crops per step at most (random subset; 0 = all).
        train_crop_sizes: side of the training crops, drawn per step from these (multiples of the
            patch size; empty = the CLIP's input size). Training at several sizes adapts the CLIP
            (FT) and the mask prompts (MPT) to the smaller crops of the fast inference mode
            ``MODEL.TWO_STAGE.FAST.CROP_SIZE``; evaluation always uses the input size.
        loss: "ovseg" (symmetric contrastive loss over the step's pairs, templated names,
            learnable logit scale) or "classification" (see the module docstring).
        rrc_scale: area range of the random-resized crop of each training crop; (1, 1) = off.
        same_name_negatives: "ovseg" loss: pairs of the same name are negatives of each other
            (OVSeg); False leaves them out of each other's negatives.
    """

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        crop_classifier: MaskedCropClassifier,
        mode: str = "mpt",
        vocabulary: str = "batch",
        dataset_vocabulary: Sequence[str] = (),
        mask_jitter: int = 0,
        max_crops: int = 0,
        train_crop_sizes: Sequence[int] = (),
        loss: str = "ovseg",
        rrc_scale: Sequence[float] = (0.9, 1.0),
        same_name_negatives: bool = True,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"MODEL.MASK_ADAPTED_CLIP.LOSS must be one of {LOSSES}, got {loss!r}")
        if len(rrc_scale) != 2 or not 0.0 < rrc_scale[0] <= rrc_scale[1] <= 1.0:
            raise ValueError(
                f"MODEL.MASK_ADAPTED_CLIP.RRC_SCALE must be (min, max) in (0, 1], got {rrc_scale}"
            )
        if mode not in MODES:
            raise ValueError(
                f"MODEL.MASK_ADAPTED_CLIP.MODE must be one of {sorted(MODES)}, got {mode!r}"
            )
        if vocabulary not in ("batch", "dataset"):
            raise ValueError(
                "MODEL.MASK_ADAPTED_CLIP.VOCABULARY must be 'batch' or 'dataset', "
                f"got {vocabulary!r}"
            )
        if vocabulary == "dataset" and not dataset_vocabulary:
            raise ValueError(
                "VOCABULARY 'dataset' needs the training dataset's class names (stuff_classes)"
            )
        train_image, train_prompts = MODES[mode]
        if train_prompts and crop_classifier.encoder.depth == 0:
            raise ValueError(
                f"mode {mode!r} trains mask prompts: MODEL.CLIP.MASK_PROMPT_DEPTH must be > 0"
            )
        self.clip = clip_model
        self.crop_classifier = crop_classifier
        self.mode = mode
        self.vocabulary = vocabulary
        self.dataset_vocabulary = list(dataset_vocabulary)
        self.mask_jitter = int(mask_jitter)
        self.max_crops = int(max_crops)
        self.train_crop_sizes = [
            crop_classifier.check_crop_size(size, "MODEL.MASK_ADAPTED_CLIP.TRAIN_CROP_SIZES")
            for size in train_crop_sizes
        ]
        for p in self.clip.parameters():
            p.requires_grad_(False)
        if train_image:
            for p in self.clip.visual.parameters():
                p.requires_grad_(True)
        if crop_classifier.encoder.prompts is not None:
            crop_classifier.encoder.prompts.requires_grad_(train_prompts)
        self.loss = loss
        self.rrc_scale = (float(rrc_scale[0]), float(rrc_scale[1]))
        self.same_name_negatives = bool(same_name_negatives)
        if loss == "ovseg":
            self.clip.logit_scale.requires_grad_(True)
        self._train_image = train_image
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        mcfg = cfg.MODEL.MASK_ADAPTED_CLIP
        clip_model = build_clip_from_cfg(cfg)
        _, train_prompts = MODES.get(mcfg.MODE, (False, False))
        clf = MaskedCropClassifier.from_config(
            cfg, clip_model=clip_model, train_prompts=train_prompts
        )
        clf["register_clip"] = False
        if mcfg.MODE == "ft":
            clf.update(prompt_depth=0, prompts=None)
        vocab = []
        if cfg.DATASETS.TRAIN:
            meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
            vocab = list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])
        return {
            "clip_model": clip_model,
            "crop_classifier": MaskedCropClassifier(**clf),
            "mode": mcfg.MODE,
            "vocabulary": mcfg.VOCABULARY,
            "dataset_vocabulary": vocab,
            "mask_jitter": mcfg.MASK_JITTER,
            "max_crops": mcfg.MAX_CROPS,
            "train_crop_sizes": mcfg.TRAIN_CROP_SIZES,
            "loss": mcfg.LOSS,
            "rrc_scale": mcfg.RRC_SCALE,
            "same_name_negatives": mcfg.SAME_NAME_NEGATIVES,
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def train(self, mode: bool = True):
        super().train(mode)
        if not self._train_image:
            self.clip.eval()  # frozen towers stay in eval mode
        return self

    def _batch_vocabulary(self, names: List[str]) -> List[str]:
        if self.vocabulary == "dataset":
            known = set(self.dataset_vocabulary)
            return self.dataset_vocabulary + sorted({n for n in names if n not in known})
        return sorted(set(names))

    def forward(self, batched_inputs: List[Dict]):
        """Training: ``{"loss_mask_cls": L}``; eval: ``mask_cls`` outputs (MaskedCropClassifier)."""
        if not self.training:
            return self.crop_classifier.classify_inputs(batched_inputs)
        images, masks, names = [], [], []
        for i, x in enumerate(batched_inputs):
            if "masks" not in x or "categories" not in x:
                raise KeyError(
                    f"training input {i} has no 'masks'/'categories': train MaskAdaptedCLIP with "
                    "INPUT.DATASET_MAPPER_NAME mask_category"
                )
            m = x["masks"].to(self.device)
            images.append(x["image"].to(self.device))
            masks.append(jitter_masks(m, self.mask_jitter) if self.mask_jitter > 0 else m)
        crops, crop_masks, valid = self.crop_training_batch(images, masks)
        for x, v in zip(batched_inputs, valid):
            names.extend(n for n, k in zip(x["categories"], v.tolist()) if k)
        if self.max_crops > 0 and crops.shape[0] > self.max_crops:
            keep = torch.randperm(crops.shape[0], device=crops.device)[: self.max_crops]
            crops, crop_masks = crops[keep], crop_masks[keep]
            names = [names[i] for i in keep.tolist()]
        if (
            not names
        ):  # no pair in the batch: a zero loss that still reaches every trained parameter
            zero = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
            return {"loss_mask_cls": zero}
        crops, crop_masks = random_resized_crop(crops, crop_masks, self.rrc_scale)
        emb = self.crop_classifier.encode_crops(crops, crop_masks)
        storage = get_event_storage()
        if self.loss == "ovseg":
            texts = self.pair_texts(names)
            text = self.crop_classifier.text_classifier.encode_texts(texts).to(emb.dtype)
            scale = clamped_logit_scale(self.clip.logit_scale)
            same = None
            if not self.same_name_negatives:
                same = same_text_matrix(names, device=emb.device)
                # pairs per crop that share its name (left out of its negatives)
                storage.put_scalar("same_name_pairs", float(same.sum() - len(names)) / len(names))
            loss = info_nce(emb, text, scale, normalize=False, same=same)
            storage.put_scalar("logit_scale", float(scale.detach()), smoothing_hint=False)
        else:
            vocabulary = self._batch_vocabulary(names)
            index = {n: i for i, n in enumerate(vocabulary)}
            labels = torch.tensor([index[n] for n in names], dtype=torch.long, device=emb.device)
            text = self.crop_classifier.text_classifier(vocabulary).to(emb.dtype)
            loss = contrastive_classification(emb, text, labels, self.crop_classifier.logit_scale)
        storage.put_scalar("num_crops", float(len(names)), smoothing_hint=False)
        return {"loss_mask_cls": loss}

    def pair_texts(self, names: Sequence[str]) -> List[str]:
        """One text per pair: a template of the text classifier's set, drawn at random per pair,
        filled with the pair's name (the "ovseg" loss)."""
        templates = self.crop_classifier.text_classifier.templates
        draws = torch.randint(len(templates), (len(names),)).tolist()
        return [templates[k].format(name) for k, name in zip(draws, names)]

    def crop_training_batch(
        self, images: List[torch.Tensor], masks: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Masked crops of one training step (``MaskedCropClassifier.crop``) at a crop size drawn
        from ``train_crop_sizes`` (the classifier's own size when empty).

        Returns:
            crops (N, 3, S, S), crop masks (N, S, S), B valid flags (K_i,).
        """
        size = None
        if self.train_crop_sizes:
            size = self.train_crop_sizes[int(torch.randint(len(self.train_crop_sizes), ()))]
        return self.crop_classifier.crop(images, masks, size)

    def export_clip(self, path: str) -> None:
        """Write the adapted CLIP (+ its mask prompts) as a checkpoint ``build_clip`` /
        ``MODEL.CLIP.PRETRAINED`` load (prompts through ``load_mask_prompts``)."""
        prompts = self.crop_classifier.encoder.prompts
        save_clip_checkpoint(
            path,
            self.clip,
            mask_prompts=prompts,
            meta={"source": type(self).__name__, "mode": self.mode},
        )
