"""``MGCA``: multi-grained cross-modal alignment (Liu, Ge, Liu, Huang, arXiv 2403.03707).

Text-supervised dense alignment at three granularities from image-caption pairs only, with pseudo
correspondences and hard negatives (``single_stage.md`` §3; every choice below that is not in the
paper's abstract is project design and has a ``MODEL.MGCA`` key):

- **Encoders.** f_v is the MODEL.CLIP image tower, frozen up to ``FREEZE_AT`` blocks; its last block
  runs on the value path only (MaskCLIP / TCL's ``ignore_last_attn``: every token attends to itself)
  to give local tokens, which ``ln_post`` and CLIP's projection map into the joint space. A
  trainable decoder g (2× bilinear upsample, then ``DECODER_LAYERS`` pre-activation 3×3 conv layers
  with LayerNorm and GELU, added residually, the last conv zero-initialised so that training starts
  from CLIP's own dense features) gives pixel embeddings Z (B, D, 2H/p, 2W/p). f_t is CLIP's text
  tower, frozen: a caption embedding s_b and up to ``MAX_ENTITIES`` entities e_bj =
  f_t(``ENTITY_TEMPLATE``.format(noun chunk)) per image (the caption itself when it has no chunk);
  the chunks of each caption come with the input (``nouns``, added by the caption mapper with the
  ``ENTITY_MODE`` / ``ENTITY_CHUNKER`` extractor, ``ov_seg.data.caption_nouns``).
- **Grounding** ``m_bj(x) = σ(w·cos(z_x, e_bj) + β)`` with learnable w, β (``GROUNDING_INIT``), the
  source of the pseudo correspondences (detached wherever it selects).
- **Object level** (``loss_obj``): region vectors r_bj = Σ m z / Σ m against entities with hard
  negatives both ways, plus the image-caption InfoNCE of ō_b = mean_j r_bj.
- **Region level** (``loss_reg``): ``NUM_META_POINTS`` meta-points per image (soft k-means, grid
  init); positive units U⁺_bj by grounding mass, intra-image hard negatives = the image's other
  units.
- **Pixel level** (``loss_pix``): top-``K_PIX`` grounded pixels as positives, top-``K_PIX`` most
  similar ungrounded pixels of the batch as hard negatives.

Inference: dense Z (whole image or sliding windows), pixel scores cos(z_x, t_k) aggregated by the
prediction unit ``TEST.UNIT_MODE`` ("adaptive" semantic unit, fixed "group", or "pixel";
``ov_seg.modeling.heads.semantic_units``). A vocabulary entry named ``TEST.BACKGROUND_NAME`` is
scored by the threshold ``TEST.BG_THRESH`` on the maximum class probability (TCL style).
"""

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.clip import (
    TextClassifier,
    build_clip_from_cfg,
    clip_sizes,
)
from ov_seg.modeling.heads.mgca import DenseCLIPEncoder, MGCADecoder
from ov_seg.modeling.heads.semantic_units import UNIT_PREDICTORS
from ov_seg.modeling.losses.contrastive import clamped_logit_scale, info_nce
from ov_seg.modeling.losses.hard_negative import same_text_matrix
from ov_seg.modeling.losses.meta_points import grid_init_centers, soft_kmeans
from ov_seg.modeling.losses.mgca import (
    build_correspondences,
    grounding_masks,
    object_level_losses,
    object_regions,
    own_image_rows,
    pixel_level_loss,
    region_level_loss,
)
from ov_seg.modeling.meta_arch.base import (
    InferenceOptions,
    PerImageSegmentor,
    SlidingWindow,
    default_test_vocabulary,
)

__all__ = ["MGCA", "MGCALossConfig", "MGCATestConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MGCALossConfig:
    """Training settings of MGCA's three levels (``MODEL.MGCA``).

    Attributes:
        grounding_init: initial (w, β) of the grounding m = σ(w·cos + β).
        logit_scale_init, max_logit_scale: initial 1/τ of the learnable logit scale, its clamp.
        loss_weights: (λ_obj, λ_reg, λ_pix); a zero weight skips that level.
        k_neg: k_n hardest negatives per L_hn (<= 0: all valid negatives).
        k_pix: k_pix positive / hard-negative pixels per entity (<= 0: all qualifying).
        num_meta_points: N_meta, meta-points per image; meta_iters / meta_temperature: soft
            k-means (also the adaptive unit's at inference).
        pos_thresh, neg_thresh: θ_pos, θ_neg.
        filter_cross_image_units: drop other images' meta-points that would be positive units of
            the entity from its negatives.
    """

    grounding_init: Tuple[float, float] = (10.0, -2.5)
    logit_scale_init: float = 1.0 / 0.07
    max_logit_scale: float = 100.0
    loss_weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    k_neg: int = 16
    k_pix: int = 32
    num_meta_points: int = 16
    meta_iters: int = 3
    meta_temperature: float = 0.1
    pos_thresh: float = 0.5
    neg_thresh: float = 0.2
    filter_cross_image_units: bool = True

    @classmethod
    def from_config(cls, mc) -> "MGCALossConfig":
        """From the ``MODEL.MGCA`` node."""
        return cls(
            grounding_init=tuple(mc.GROUNDING_INIT),
            logit_scale_init=mc.LOGIT_SCALE_INIT,
            max_logit_scale=mc.LOGIT_SCALE_MAX,
            loss_weights=tuple(mc.LOSS_WEIGHTS),
            k_neg=mc.K_NEG,
            k_pix=mc.K_PIX,
            num_meta_points=mc.NUM_META_POINTS,
            meta_iters=mc.META_ITERS,
            meta_temperature=mc.META_TEMPERATURE,
            pos_thresh=mc.POS_THRESH,
            neg_thresh=mc.NEG_THRESH,
            filter_cross_image_units=mc.FILTER_CROSS_IMAGE_UNITS,
        )


@dataclass(frozen=True)
class MGCATestConfig:
    """Inference settings of MGCA (``MODEL.MGCA.TEST``).

    Attributes:
        unit_mode: "adaptive", "group" or "pixel" (``UNIT_PREDICTORS``).
        unit_num: initial units of the adaptive semantic unit; group_num: groups of the "group"
            mode.
        unit_purity, unit_max_splits: ρ threshold and split depth of the adaptive unit.
        unit_impure_leaf: "pixel" (the pixels of a still impure leaf keep their scores) or "unit"
            (they take the leaf's scores).
        background_name, bg_thresh: a vocabulary entry with this name gets the constant
            probability ``bg_thresh`` instead of a text score (``bg_thresh`` 0 with such an entry:
            never chosen).
        slide_window, slide_stride: sliding-window inference in pixels (0 = whole image);
            multiples of the patch size.
    """

    unit_mode: str = "adaptive"
    unit_num: int = 32
    group_num: int = 8
    unit_purity: float = 0.6
    unit_max_splits: int = 2
    unit_impure_leaf: str = "pixel"
    background_name: str = "background"
    bg_thresh: float = 0.0
    slide_window: int = 0
    slide_stride: int = 0

    @classmethod
    def from_config(cls, mc) -> "MGCATestConfig":
        """From the ``MODEL.MGCA`` node (its ``TEST`` sub-node; UNIT_NUM 0 = 2 N_meta)."""
        t = mc.TEST
        return cls(
            unit_mode=t.UNIT_MODE,
            unit_num=t.UNIT_NUM or 2 * mc.NUM_META_POINTS,
            group_num=t.GROUP_NUM,
            unit_purity=t.UNIT_PURITY,
            unit_max_splits=t.UNIT_MAX_SPLITS,
            unit_impure_leaf=t.UNIT_IMPURE_LEAF,
            background_name=t.BACKGROUND_NAME,
            bg_thresh=t.BG_THRESH,
            slide_window=t.SLIDE_WINDOW,
            slide_stride=t.SLIDE_STRIDE,
        )


@META_ARCH_REGISTRY.register()
class MGCA(PerImageSegmentor):
    """MGCA meta-architecture (see the module doc).

    Inputs are detectron2 dicts with ``image`` (3, H, W) uint8 RGB; training inputs carry
    ``captions`` (list of str, one drawn per step) and ``nouns`` (the noun chunks of each caption),
    test inputs a ``vocabulary`` (class names; default: the first test dataset's
    ``stuff_classes``).
    """

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        templates,
        encoder: DenseCLIPEncoder,
        decoder: MGCADecoder,
        max_entities: int = 3,
        entity_template: str = "a photo of a {}.",
        loss_config: MGCALossConfig = MGCALossConfig(),
        test_config: MGCATestConfig = MGCATestConfig(),
        default_vocabulary: Sequence[str] = (),
        text_cache_size: int = 65536,
        seen_calibration: Optional[SeenCalibration] = None,
        memory_budget_mb: float = 0.0,
    ):
        """
        Args:
            clip_model: the open_clip model (its text tower encodes captions, entities and class
                names, frozen; its image tower is ``encoder.visual``).
            templates: class-name prompt templates (a ``TEMPLATE_SETS`` name or a list).
            encoder: the ``DenseCLIPEncoder`` on ``clip_model.visual``.
            decoder: the pixel decoder g.
            max_entities: J_max, entities per image (a random subset in training when the caption
                has more).
            entity_template: prompt of an entity, "{}" = the chunk without its determiner.
            loss_config: the training settings (``MGCALossConfig``).
            test_config: the inference settings (``MGCATestConfig``).
            default_vocabulary: class names for test inputs without a ``vocabulary`` field.
            text_cache_size: caption / entity embeddings kept in memory (the text tower is frozen).
            seen_calibration: calibrated stacking of the seen names' logits at inference; None =
                off.
            memory_budget_mb: MiB of full-resolution output maps per image
                (``TEST.MEMORY_BUDGET_MB``; 0 = unbounded): larger ``sem_seg`` outputs become label
                maps (``ov_seg.modeling.postprocess.semantic_postprocess``).
        """
        unit_mode, unit_impure_leaf = test_config.unit_mode, test_config.unit_impure_leaf
        loss_weights = loss_config.loss_weights
        slide_window, slide_stride = test_config.slide_window, test_config.slide_stride
        if unit_mode not in UNIT_PREDICTORS:
            raise KeyError(
                f"Unknown MODEL.MGCA.TEST.UNIT_MODE {unit_mode!r}; "
                f"known: {', '.join(sorted(UNIT_PREDICTORS))}"
            )
        if unit_impure_leaf not in ("pixel", "unit"):
            raise ValueError(
                f"UNIT_IMPURE_LEAF must be 'pixel' or 'unit', got {unit_impure_leaf!r}"
            )
        if len(loss_weights) != 3:
            raise ValueError(f"LOSS_WEIGHTS must be (obj, reg, pix), got {loss_weights}")
        if max_entities < 1 or "{}" not in entity_template:
            raise ValueError("MAX_ENTITIES must be >= 1 and ENTITY_TEMPLATE must contain '{}'")
        patch = encoder.patch_size
        if slide_window > 0 and (
            slide_window % patch or not 0 < slide_stride <= slide_window or slide_stride % patch
        ):
            raise ValueError(
                f"SLIDE_WINDOW ({slide_window}) and SLIDE_STRIDE ({slide_stride}) must be "
                f"multiples of the patch size {patch} with 0 < stride <= window"
            )
        super().__init__(
            seen_calibration=seen_calibration,
            default_vocabulary=default_vocabulary,
            memory_budget_mb=memory_budget_mb,
            background_names=(test_config.background_name,),
            size_divisibility=patch,
        )
        self.clip = clip_model
        self.text_classifier = TextClassifier(clip_model, templates)
        self.encoder = encoder
        self.decoder = decoder
        self.max_entities = int(max_entities)
        self.entity_template = entity_template
        self.grounding_w = nn.Parameter(torch.tensor(float(loss_config.grounding_init[0])))
        self.grounding_b = nn.Parameter(torch.tensor(float(loss_config.grounding_init[1])))
        self.logit_scale = nn.Parameter(torch.tensor(float(loss_config.logit_scale_init)).log())
        self.max_logit_scale = loss_config.max_logit_scale
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.k_neg, self.k_pix = int(loss_config.k_neg), int(loss_config.k_pix)
        self.num_meta_points = int(loss_config.num_meta_points)
        self.meta_iters = int(loss_config.meta_iters)
        self.meta_temperature = float(loss_config.meta_temperature)
        self.pos_thresh, self.neg_thresh = float(loss_config.pos_thresh), float(
            loss_config.neg_thresh
        )
        self.filter_cross_image_units = bool(loss_config.filter_cross_image_units)
        self.unit_mode = unit_mode
        self.unit_settings = {
            "num_units": int(test_config.unit_num),
            "num_groups": int(test_config.group_num),
            "purity": float(test_config.unit_purity),
            "max_splits": int(test_config.unit_max_splits),
            "impure_leaf": unit_impure_leaf,
            "iters": self.meta_iters,
            "temperature": self.meta_temperature,
        }
        self.background_name = test_config.background_name
        self.bg_thresh = float(test_config.bg_thresh)
        self.slide = SlidingWindow(slide_window, slide_stride)
        self.text_cache_size = int(text_cache_size)
        self._text_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        # new weights (MODEL.WEIGHTS, resume) invalidate the cached text embeddings
        self.register_load_state_dict_post_hook(lambda module, keys: module._text_cache.clear())

    @classmethod
    def from_config(cls, cfg):
        mc = cfg.MODEL.MGCA
        clip_model = build_clip_from_cfg(cfg)
        clip_model.requires_grad_(False)
        sizes = clip_sizes(clip_model)
        encoder = DenseCLIPEncoder(clip_model.visual, mc.FREEZE_AT, mc.VALUE_PATH)
        decoder = MGCADecoder(sizes.embed_dim, mc.DECODER_LAYERS, mc.DECODER_UPSAMPLE)
        return {
            "clip_model": clip_model,
            "templates": cfg.MODEL.CLIP.TEMPLATES,
            "encoder": encoder,
            "decoder": decoder,
            "max_entities": mc.MAX_ENTITIES,
            "entity_template": mc.ENTITY_TEMPLATE,
            "loss_config": MGCALossConfig.from_config(mc),
            "test_config": MGCATestConfig.from_config(mc),
            "default_vocabulary": default_test_vocabulary(cfg),
            "seen_calibration": SeenCalibration(cfg),
            "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        }

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()  # cached embeddings live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen towers (and the trainable last block, which has no dropout) stay in eval mode
        self.clip.eval()
        return self

    def scale(self) -> torch.Tensor:
        """Contrastive logit scale 1/τ = exp(log s), clamped at ``max_logit_scale``."""
        return clamped_logit_scale(self.logit_scale, self.max_logit_scale)

    # ------------------------------------------------------------------ inputs
    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Z = g(f_v(images)): (B, 3, H, W) normalised -> (B, D, up·H/p, up·W/p)."""
        return self.decoder(self.encoder(images))

    def entities(
        self, captions: Sequence[str], chunks_per_caption: Sequence[Sequence[str]]
    ) -> List[List[str]]:
        """Entity prompts of each caption: up to J_max of its noun chunks (``chunks_per_caption``,
        aligned: the input's ``nouns``, ``ENTITY_MODE`` / ``ENTITY_CHUNKER``) in
        ``entity_template`` (a random subset in training, the first ones otherwise), or the caption
        itself when it has none."""
        out = []
        for caption, chunks in zip(captions, chunks_per_caption):
            chunks = list(dict.fromkeys(c for c in chunks if c))
            if len(chunks) > self.max_entities:
                if self.training:
                    chunks = random.sample(chunks, self.max_entities)
                else:
                    chunks = chunks[: self.max_entities]
            out.append([self.entity_template.format(c) for c in chunks] or [caption])
        return out

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, D) normalised text embeddings through the frozen text tower, with an LRU cache of
        ``text_cache_size`` strings (entity prompts repeat across batches)."""
        cache = self._text_cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for t, e in zip(missing, self.text_classifier.encode_texts(missing).to(self.device)):
                cache[t] = e
        for t in texts:
            cache.move_to_end(t)
        out = torch.stack([cache[t] for t in texts])
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        return out

    def texts(self, batched_inputs: List[Dict]):
        """One caption per image (drawn at random) and its entities.

        Returns:
            captions (B, D), entity embeddings (E, D) (both normalised, no gradient), the image
            index of each entity (E,) and the entity strings.
        """
        captions, chunks, entity_texts, image_index = [], [], [], []
        for i, x in enumerate(batched_inputs):
            k, caps = self.draw_caption(x, i)
            captions.append(caps[k])
            chunks.append(self.caption_nouns(x, k, i))
        for i, ents in enumerate(self.entities(captions, chunks)):
            entity_texts.extend(ents)
            image_index.extend([i] * len(ents))
        emb = self.encode_texts(captions + entity_texts)
        b = len(captions)
        index = torch.tensor(image_index, dtype=torch.long, device=self.device)
        return emb[:b], emb[b:], index, entity_texts

    # ------------------------------------------------------------------ training
    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The level losses of a caption batch (``level_losses``)."""
        images = self.preprocess_images(batched_inputs)
        caption_emb, entity_emb, image_index, entity_texts = self.texts(batched_inputs)
        z = self.pixel_embeddings(images.tensor)
        return self.level_losses(z, caption_emb, entity_emb, image_index, entity_texts)

    def level_losses(
        self,
        z: torch.Tensor,
        caption_emb: torch.Tensor,
        entity_emb: torch.Tensor,
        image_index: torch.Tensor,
        entity_texts: Sequence[str],
    ) -> Dict[str, torch.Tensor]:
        """The weighted level losses.

        Args:
            z: (B, D, h, w) pixel embeddings.
            caption_emb: (B, D) caption embeddings s_b.
            entity_emb: (E, D) entity embeddings e_bj; image_index: (E,) their images.
            entity_texts: the E entity strings (same-string candidates are never negatives).

        Returns:
            ``loss_obj``, ``loss_reg``, ``loss_pix`` for the levels with a non-zero weight.
        """
        w_obj, w_reg, w_pix = self.loss_weights
        b, d, h, w = z.shape
        pixels = z.flatten(2).transpose(1, 2)  # (B, N, D)
        scale = self.scale()
        same_text = same_text_matrix(entity_texts, device=z.device)
        cos, masks = grounding_masks(pixels, entity_emb, self.grounding_w, self.grounding_b)
        losses = {}
        if w_obj:
            regions = object_regions(pixels, own_image_rows(masks, image_index), image_index)
            r2e, e2r = object_level_losses(
                regions, entity_emb, image_index, same_text, self.k_neg, scale
            )
            image_emb = regions.new_zeros(b, d).index_add(0, image_index, regions)
            counts = torch.bincount(image_index, minlength=b).clamp_min(1).to(regions.dtype)
            nce = info_nce(image_emb / counts[:, None], caption_emb, scale)
            losses["loss_obj"] = w_obj * (r2e + e2r + nce)
        if w_reg or w_pix:
            init = grid_init_centers(z, self.num_meta_points)
            centers, assign = soft_kmeans(pixels, init, self.meta_iters, self.meta_temperature)
            corr = build_correspondences(
                cos,
                masks,
                assign,
                centers,
                entity_emb,
                image_index,
                pos_thresh=self.pos_thresh,
                neg_thresh=self.neg_thresh,
                k_pix=self.k_pix,
                filter_cross_image=self.filter_cross_image_units,
            )
            if w_reg:
                u2e, e2u = region_level_loss(
                    centers,
                    corr,
                    entity_emb,
                    image_index,
                    same_text,
                    k_neg=self.k_neg,
                    logit_scale=scale,
                )
                losses["loss_reg"] = w_reg * (u2e + e2u)
            if w_pix:
                p2e, e2p = pixel_level_loss(
                    pixels,
                    corr,
                    entity_emb,
                    image_index,
                    same_text,
                    k_neg=self.k_neg,
                    logit_scale=scale,
                )
                losses["loss_pix"] = w_pix * (p2e + e2p)
                self._log(corr)
        return losses

    def _log(self, corr) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # outside a trainer
            return
        storage.put_scalar("mgca/logit_scale", float(self.scale()), smoothing_hint=False)
        storage.put_scalar("mgca/grounding_w", float(self.grounding_w), smoothing_hint=False)
        storage.put_scalar("mgca/grounding_b", float(self.grounding_b), smoothing_hint=False)
        storage.put_scalar("mgca/pos_pixels", float(corr.pos_pixels_valid.sum(1).float().mean()))

    # ------------------------------------------------------------------ inference
    def dense_features(self, image: torch.Tensor) -> torch.Tensor:
        """Z of one normalised image (3, H, W) (H, W multiples of the patch size): (D, h', w'),
        averaged over sliding windows when ``slide`` is on and the image is larger."""
        if not self.slide.active(*image.shape[-2:]):
            return self.pixel_embeddings(image[None])[0]
        stride = self.encoder.patch_size // self.decoder.upsample  # feature stride in pixels
        return self.slide.average(image, lambda crop: self.pixel_embeddings(crop[None])[0], stride)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``dense_features``: (D, h', w'), independent of the vocabulary and of the options."""
        return self.dense_features(image)

    def class_cosines(self, features: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """(K, h', w') unit-text cosines of one feature map (D, h', w') for K class names (no
        background entry), with the configured unit."""
        class_emb = self.text_embeddings(names).to(features.device)
        return UNIT_PREDICTORS[self.unit_mode](features, class_emb, **self.unit_settings)

    def class_scores(
        self,
        features: torch.Tensor,
        vocabulary: Sequence[str],
        options: Optional[InferenceOptions] = None,
    ) -> torch.Tensor:
        """Class probabilities (K, h', w') of one feature map, with the configured unit; a
        background entry gets the constant ``bg_thresh``."""
        text_ids, names = self.split_background(vocabulary)
        cosines = self.class_cosines(features, names)
        calibration = self.calibration(self.resolve_options(options))
        probs = calibration.apply(cosines * self.scale(), names).softmax(dim=0)
        if len(text_ids) == len(vocabulary):
            return probs
        full = probs.new_full((len(vocabulary), *probs.shape[1:]), self.bg_thresh)
        full[text_ids] = probs
        return full

    def score(
        self, encoded: torch.Tensor, vocabulary: Sequence[str], options: InferenceOptions
    ) -> torch.Tensor:
        """``class_scores`` at the feature resolution (K, h', w') (``postprocess`` upsamples)."""
        return self.class_scores(encoded, vocabulary, options)

    def extra_repr(self) -> str:
        return (
            f"loss_weights={self.loss_weights}, k_neg={self.k_neg}, k_pix={self.k_pix}, "
            f"meta_points={self.num_meta_points}, unit_mode={self.unit_mode}"
        )
