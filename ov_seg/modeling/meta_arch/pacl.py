"""``PACL``: patch-aligned contrastive learning on a frozen CLIP (Mukhoti et al., CVPR 2023).

Training (caption datasets, ``INPUT.DATASET_MAPPER_NAME caption``): both CLIP towers are frozen. The
patch tokens X (B, N, d_v) of the image tower (after its last LayerNorm, before the projection) go
through a trainable embedder e_v (``MODEL.PACL.EMBEDDER``): V = e_v(X) (B, N, D). Every image is
scored against every caption of the batch with PACL's compatibility (``losses/pacl.py``)::

    φ(x, y) = cos(Σ_i softmax_i(cos(v_i, t) / τ_p) v_i, t)

and the symmetric InfoNCE on Φ (B, B) with a learnable logit scale is minimised. With prompt
augmentation, each image also forms a second pair with a prompt built from a noun of its caption
(one random noun in one random template); the two B×B losses are averaged (``PROMPT_AUG.WEIGHT``).
The nouns of each caption come with the input (``nouns``, added by the caption mapper with the
``PROMPT_AUG`` extractor settings, ``ov_seg.data.caption_nouns``).

Inference: the per-patch class scores s_{i,k} = cos(v_i, t_k) against the template-ensembled class
embeddings, upsampled bilinearly to the image; ``sem_seg`` holds softmax_k(s · logit_scale). With
the stride trick (``INFER_STRIDE`` < patch size) the score map has stride ``INFER_STRIDE``: "shift"
runs (p / stride)² passes on shifted inputs and interleaves them, "conv" runs one pass with a
strided patch embedding. A vocabulary entry named in ``BG_CLASS_NAMES`` is not scored by text: its
channel is 1 where the other classes' distribution is too flat (entropy > ``BG_ENTROPY``) or the
best cosine is too low (< ``BG_SCORE``), else 0.

``EMBEDDER clip_projection`` is the vanilla-patch baseline: CLIP's own visual projection on every
patch token, nothing trained (evaluate it with ``--eval-only``), CLIP's own logit scale.
"""

import logging
import math
import random
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.clip import (
    MaskPromptVisionEncoder,
    TextClassifier,
    build_clip_from_cfg,
    clip_sizes,
)
from ov_seg.modeling.clip.text_classifier import TEMPLATE_SETS
from ov_seg.modeling.heads.pacl import StridedPatchEncoder, build_pacl_embedder
from ov_seg.modeling.losses.contrastive import clamped_logit_scale
from ov_seg.modeling.losses.pacl import pacl_info_nce, patch_text_cosine, text_group_ids
from ov_seg.modeling.meta_arch.base import (
    InferenceOptions,
    PerImageSegmentor,
    default_test_vocabulary,
)

__all__ = ["PACL", "PACLEncoding"]

logger = logging.getLogger(__name__)

# CLIP's 7-template ensemble, quoted for PACL's prompt augmentation and class embeddings
# (MODEL.CLIP.TEMPLATES "clip7").
PACL_TEMPLATES = TEMPLATE_SETS["clip7"]


def _entropy_background(probs: torch.Tensor, cosines: torch.Tensor, thresh: float) -> torch.Tensor:
    """(K, H, W) probabilities → (H, W) bool: entropy −Σ p log p above ``thresh``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(0) > thresh


def _score_background(probs: torch.Tensor, cosines: torch.Tensor, thresh: float) -> torch.Tensor:
    """(K, H, W) cosines → (H, W) bool: best cosine below ``thresh``."""
    return cosines.max(0).values < thresh


# BG_MODE -> rule(probs (K, H, W), cosines (K, H, W), threshold) -> (H, W) background mask
BACKGROUND_RULES: Dict[str, Callable] = {"entropy": _entropy_background, "score": _score_background}

# STRIDE_MODE -> names the dense-encoding implementation (PACL._encode_<mode>)
STRIDE_MODES = ("shift", "conv")


class PACLEncoding(NamedTuple):
    """The vocabulary-independent part of PACL's inference on one image (``PACL.encode``)."""

    patches: (
        torch.Tensor
    )  # (r², h·w, D) embedded patch tokens of the r² shifted passes (r = 1: one)
    grid: Tuple[int, int]  # (h, w) tokens per pass
    shifts: int  # r = p / stride for "shift", 1 for "conv"
    size: Tuple[int, int]  # (H, W) of the image


@META_ARCH_REGISTRY.register()
class PACL(PerImageSegmentor):
    """PACL meta-architecture (see module doc).

    Inputs are detectron2 dicts with ``image`` (3, H, W) uint8 RGB; training inputs carry
    ``captions`` (list of str; one is drawn per step) and, with prompt augmentation, ``nouns`` (the
    noun phrases of each caption), test inputs a ``vocabulary`` (list of class names; default: the
    ``stuff_classes`` of their ``dataset_name``, else of the first test dataset).
    """

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        embedder: nn.Module,
        templates: Sequence[str] = PACL_TEMPLATES,
        patch_softmax_temp: float = 1.0,
        logit_scale_init: float = 1.0 / 0.07,
        logit_scale_max: float = 100.0,
        chunk_size: int = 64,
        checkpoint_chunks: bool = True,
        prompt_weight: float = 1.0,
        exclude_same_text: bool = True,
        infer_stride: int = 4,
        stride_mode: str = "shift",
        bg_mode: str = "entropy",
        bg_entropy: float = 1.5,
        bg_score: float = 0.7,
        bg_class_names: Sequence[str] = ("background",),
        seen_calibration: Optional[SeenCalibration] = None,
        default_vocabulary: Sequence[str] = (),
        memory_budget_mb: float = 0.0,
    ):
        """
        Args:
            clip_model: an open_clip ``CLIP`` with a ``VisionTransformer`` image tower; frozen here.
            embedder: patch embedder (B, N, d_v) → (B, N, D) (``heads/pacl.py``); trained when it
                has parameters (the baseline ``CLIPProjectionEmbedder`` has none).
            templates: prompt templates ("{}" = the name) for the class embeddings at test and for
                the noun prompts of prompt augmentation.
            patch_softmax_temp: τ_p of φ's patch softmax.
            logit_scale_init: initial s = 1/τ of the InfoNCE (learnable, exp-parametrised).
            logit_scale_max: clamp of s.
            chunk_size: texts per chunk of Φ.
            checkpoint_chunks: recompute Φ's chunks in backward (bounded memory).
            prompt_weight: weight W of the noun-prompt loss: L = (L_cap + W·L_noun) / (1 + W);
                0 disables prompt augmentation (training inputs then need no ``nouns``).
            exclude_same_text: pairs whose texts say the same thing (the same noun of two
                prompts; captions with the same noun set) are not negatives of each other.
            infer_stride: stride of the test-time score map (the patch size, or 0, disables the
                trick).
            stride_mode: "shift" or "conv" (see module doc).
            bg_mode: "entropy" or "score": rule for a background entry of the vocabulary.
            bg_entropy: entropy threshold of the "entropy" rule.
            bg_score: cosine threshold of the "score" rule.
            bg_class_names: vocabulary names treated as background.
            seen_calibration: calibrated stacking of the seen names' logits at inference; None =
                off.
            default_vocabulary: vocabulary of test inputs that carry none.
            memory_budget_mb: MiB of full-resolution output maps per image
                (``TEST.MEMORY_BUDGET_MB``; 0 = unbounded): larger ``sem_seg`` outputs become label
                maps (``ov_seg.modeling.postprocess.semantic_postprocess``).
        """
        if stride_mode not in STRIDE_MODES:
            raise ValueError(
                f"Unknown STRIDE_MODE {stride_mode!r}; known: {', '.join(STRIDE_MODES)}"
            )
        if bg_mode not in BACKGROUND_RULES:
            raise ValueError(
                f"Unknown BG_MODE {bg_mode!r}; known: {', '.join(sorted(BACKGROUND_RULES))}"
            )
        if prompt_weight < 0:
            raise ValueError(f"PROMPT_AUG.WEIGHT must be >= 0, got {prompt_weight}")
        super().__init__(
            seen_calibration=seen_calibration,
            default_vocabulary=default_vocabulary,
            memory_budget_mb=memory_budget_mb,
            background_names=bg_class_names,
        )
        for p in clip_model.parameters():
            p.requires_grad_(False)
        self.clip = clip_model.eval()
        self.embedder = embedder
        sizes = clip_sizes(clip_model)
        self.patch_size = sizes.patch_size
        stride = self.patch_size if infer_stride <= 0 else int(infer_stride)
        if stride > self.patch_size or (stride_mode == "shift" and self.patch_size % stride):
            raise ValueError(
                f"INFER_STRIDE {infer_stride} must be <= the patch size {self.patch_size} and, for "
                f"STRIDE_MODE shift, divide it"
            )
        self.infer_stride = stride
        self.stride_mode = stride_mode
        # encoders share the CLIP image tower; kept out of the module tree (the CLIP is saved once)
        object.__setattr__(self, "_encoder", MaskPromptVisionEncoder(clip_model.visual, depth=0))
        strided = StridedPatchEncoder(clip_model.visual, stride) if stride_mode == "conv" else None
        object.__setattr__(self, "_strided_encoder", strided)
        self.text_classifier = TextClassifier(clip_model, templates=tuple(templates))
        self.templates = tuple(self.text_classifier.templates)
        self.patch_softmax_temp = float(patch_softmax_temp)
        self.trainable = any(p.requires_grad for p in embedder.parameters())
        # learnable s = 1/τ; the baseline (nothing trained) uses CLIP's own
        self.logit_scale = (
            nn.Parameter(torch.tensor(math.log(logit_scale_init))) if self.trainable else None
        )
        self.logit_scale_max = float(logit_scale_max)
        self.chunk_size = int(chunk_size)
        self.checkpoint_chunks = bool(checkpoint_chunks)
        self.prompt_weight = float(prompt_weight)
        self.exclude_same_text = bool(exclude_same_text)
        self.bg_rule = BACKGROUND_RULES[bg_mode]
        self.bg_thresh = float(bg_entropy if bg_mode == "entropy" else bg_score)

    @classmethod
    def from_config(cls, cfg):
        from ov_seg.modeling.clip import resolve_templates

        pacl = cfg.MODEL.PACL
        clip_model = build_clip_from_cfg(cfg)
        embedder = build_pacl_embedder(pacl.EMBEDDER, clip_model, hidden_dim=pacl.EMBED_HIDDEN_DIM)
        return {
            "clip_model": clip_model,
            "embedder": embedder,
            "templates": resolve_templates(cfg.MODEL.CLIP.TEMPLATES),
            "patch_softmax_temp": pacl.PATCH_SOFTMAX_TEMP,
            "logit_scale_init": pacl.LOGIT_SCALE_INIT,
            "logit_scale_max": pacl.LOGIT_SCALE_MAX,
            "chunk_size": pacl.CHUNK_SIZE,
            "checkpoint_chunks": pacl.CHECKPOINT_CHUNKS,
            # ENABLED False = weight 0 (the caption mapper then adds no nouns either)
            "prompt_weight": pacl.PROMPT_AUG.WEIGHT if pacl.PROMPT_AUG.ENABLED else 0.0,
            "exclude_same_text": pacl.EXCLUDE_SAME_TEXT,
            "infer_stride": pacl.TEST.INFER_STRIDE,
            "stride_mode": pacl.TEST.STRIDE_MODE,
            "bg_mode": pacl.TEST.BG_MODE,
            "bg_entropy": pacl.TEST.BG_ENTROPY,
            "bg_score": pacl.TEST.BG_SCORE,
            "bg_class_names": tuple(pacl.TEST.BG_CLASS_NAMES),
            "default_vocabulary": tuple(default_test_vocabulary(cfg)),
            "seen_calibration": SeenCalibration(cfg),
            "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        }

    def train(self, mode: bool = True):
        """Train mode for the embedder; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.text_classifier.clear_cache()
        return self

    def current_logit_scale(self) -> torch.Tensor:
        """s = exp(log s) clamped at ``logit_scale_max`` (0-dim); CLIP's for the baseline."""
        log_scale = self.clip.logit_scale if self.logit_scale is None else self.logit_scale
        return clamped_logit_scale(log_scale, self.logit_scale_max)

    # ---------------------------------------------------------------------------------------------------
    # training

    def patch_embeddings(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Frozen patch tokens → embedder.

        Args:
            images: (B, 3, H, W) normalised, H and W multiples of the patch size.

        Returns:
            V (B, h*w, D) and the grid (h, w).
        """
        with torch.no_grad():
            tokens, grid = self._encoder(images)[1:]
        return self.embedder(tokens), grid

    @staticmethod
    def _pick_caption(x: dict) -> Tuple[int, str]:
        """One non-blank caption of a training input, drawn with Python's RNG: (its index in
        ``captions``, the caption)."""
        captions = x.get("captions")
        if captions is None:
            raise KeyError(
                "PACL training inputs need 'captions' (use INPUT.DATASET_MAPPER_NAME caption on a "
                "*_captions_* dataset)"
            )
        if isinstance(captions, str):
            captions = [captions]
        valid = [k for k, c in enumerate(captions) if isinstance(c, str) and c.strip()]
        if not valid:
            where = x.get("file_name", x.get("image_id", "?"))
            raise ValueError(
                f"image {where}: empty caption (captions={captions!r}); PACL needs text"
            )
        k = random.choice(valid)
        return k, captions[k]

    def noun_prompts(
        self, captions: Sequence[str], nouns_per_caption: Sequence[Sequence[str]]
    ) -> List[str]:
        """Per caption, one of its nouns (``nouns_per_caption``, aligned) in a random template (the
        caption if it has no noun)."""
        return [prompt for prompt, _ in self.noun_prompts_with_nouns(captions, nouns_per_caption)]

    def noun_prompts_with_nouns(
        self, captions: Sequence[str], nouns_per_caption: Sequence[Sequence[str]]
    ) -> List[Tuple[str, str]]:
        """``noun_prompts`` with the noun each prompt was built from: (prompt, noun) per caption
        (the caption twice if it has no noun)."""
        out = []
        for caption, nouns in zip(captions, nouns_per_caption):
            nouns = [n for n in nouns if n.strip()]
            if not nouns:
                out.append((caption, caption))
                continue
            template = random.choice(self.templates)
            noun = random.choice(nouns)
            out.append((template.format(noun), noun))
        return out

    def _batch_images(self, batched_inputs: List[dict]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised images padded to a common size (a multiple of the patch size) and the (B, N)
        mask of patches that overlap the image (padding-only patches are left out of φ's softmax).
        """
        images = [self.preprocess_image(x)[0] for x in batched_inputs]
        p = self.patch_size
        h = max(math.ceil(im.shape[-2] / p) for im in images)
        w = max(math.ceil(im.shape[-1] / p) for im in images)
        batch = images[0].new_zeros(len(images), 3, h * p, w * p)
        mask = torch.zeros(len(images), h, w, dtype=torch.bool, device=batch.device)
        for i, im in enumerate(images):
            batch[i, :, : im.shape[-2], : im.shape[-1]] = im
            mask[i, : math.ceil(im.shape[-2] / p), : math.ceil(im.shape[-1] / p)] = True
        return batch, mask.flatten(1)

    def losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        picked = [self._pick_caption(x) for x in batched_inputs]
        captions = [c for _, c in picked]
        images, patch_mask = self._batch_images(batched_inputs)
        patches, _ = self.patch_embeddings(images)
        if bool(patch_mask.all()):
            patch_mask = None
        scale = self.current_logit_scale()
        kwargs = {
            "temperature": self.patch_softmax_temp,
            "chunk_size": self.chunk_size,
            "patch_mask": patch_mask,
            "checkpoint": self.checkpoint_chunks,
        }
        texts = self.text_classifier.encode_texts(captions)
        nouns = None
        if self.prompt_weight > 0:
            nouns = [
                self.caption_nouns(x, k, i)
                for i, (x, (k, _)) in enumerate(zip(batched_inputs, picked))
            ]
        device = patches.device
        if self.exclude_same_text:
            # captions naming the same things (the same noun set; the caption itself without
            # nouns) are not each other's negatives
            keys = captions if nouns is None else [tuple(n) or c for n, c in zip(nouns, captions)]
            kwargs["text_groups"] = text_group_ids(keys, device)
        loss = pacl_info_nce(patches, texts, scale, **kwargs)
        if self.prompt_weight == 0:
            return {"loss_pacl": loss}
        pairs = self.noun_prompts_with_nouns(captions, nouns)
        prompts = self.text_classifier.encode_texts([p for p, _ in pairs])
        if self.exclude_same_text:  # two images' prompts of the same noun: not negatives
            kwargs["text_groups"] = text_group_ids([n for _, n in pairs], device)
        noun_loss = pacl_info_nce(patches, prompts, scale, **kwargs)
        norm = 1.0 + self.prompt_weight
        # the two terms sum to L = (L_caption + W L_noun) / (1 + W)
        return {
            "loss_pacl_caption": loss / norm,
            "loss_pacl_noun": noun_loss * (self.prompt_weight / norm),
        }

    # ---------------------------------------------------------------------------------------------------
    # inference

    def _encode_shift(self, image: torch.Tensor) -> PACLEncoding:
        """(p / s)² passes on shifted inputs (interleaved into a stride-s map by ``cosines``).

        The image is padded by (p - s) // 2 on the top / left, so token i of the pass shifted by a·s
        covers pixels centred at s·(i·r + a) + s/2 (r = p / s): the interleaved map is a regular
        stride-s grid.

        Args:
            image: (3, H, W) normalised.
        """
        p, s = self.patch_size, self.infer_stride
        r, pad = p // s, (p - s) // 2
        height, width = image.shape[-2:]
        n_h = math.ceil(math.ceil(height / s) / r)
        n_w = math.ceil(math.ceil(width / s) / r)
        full_h, full_w = (r - 1) * s + n_h * p, (r - 1) * s + n_w * p
        padded = F.pad(image, (pad, full_w - pad - width, pad, full_h - pad - height))
        crops = [
            padded[:, a * s : a * s + n_h * p, b * s : b * s + n_w * p]
            for a in range(r)
            for b in range(r)
        ]
        patches, grid = self.patch_embeddings(torch.stack(crops))
        return PACLEncoding(patches, tuple(grid), r, (height, width))

    def _encode_conv(self, image: torch.Tensor) -> PACLEncoding:
        """One pass with the patch embedding at stride s (positional embedding resized).

        Same geometry as the shift variant: top / left padding (p - s) // 2, token m centred at
        s·m + s/2.
        """
        p, s = self.patch_size, self.infer_stride
        pad = (p - s) // 2
        height, width = image.shape[-2:]
        f_h, f_w = math.ceil(height / s), math.ceil(width / s)
        full_h, full_w = (f_h - 1) * s + p, (f_w - 1) * s + p
        padded = F.pad(
            image, (pad, max(0, full_w - pad - width), pad, max(0, full_h - pad - height))
        )
        with torch.no_grad():
            tokens, grid = self._strided_encoder(padded[None, :, :full_h, :full_w])[1:]
        return PACLEncoding(self.embedder(tokens), tuple(grid), 1, (height, width))

    @staticmethod
    def _upsample(scores: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
        """(1, K, h, w) map of stride ``stride`` (cell m centred at stride·m + stride/2) → (K, H, W)
        cropped to the image."""
        size = (scores.shape[-2] * stride, scores.shape[-1] * stride)
        up = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        return up[0, :, :height, :width]

    def encode(self, image: torch.Tensor) -> PACLEncoding:
        """The embedded patch tokens of one normalised image (3, H, W) at the inference stride
        (``STRIDE_MODE``); independent of the vocabulary and of the options."""
        if self.stride_mode == "conv" and self.infer_stride < self.patch_size:
            return self._encode_conv(image)
        return self._encode_shift(image)

    def cosines(self, encoded: PACLEncoding, texts: torch.Tensor) -> torch.Tensor:
        """Per-pixel cosines cos(v(x), t_k): an encoding and (K, D) class embeddings → (K, H, W)."""
        r, (gh, gw) = encoded.shifts, encoded.grid
        cos = patch_text_cosine(encoded.patches, texts).view(r, r, -1, gh, gw)  # (a, b, K, i, j)
        fine = cos.permute(2, 3, 0, 4, 1).reshape(1, -1, gh * r, gw * r)  # (1, K, i·r + a, j·r + b)
        return self._upsample(fine, self.infer_stride, *encoded.size)

    def _dense_cosines_shift(self, image: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """``dense_cosines`` with the shifted passes whatever ``stride_mode``."""
        return self.cosines(self._encode_shift(image), texts)

    def dense_cosines(self, image: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Per-pixel cosines cos(v(x), t_k) of one normalised image (3, H, W) → (K, H, W)."""
        return self.cosines(self.encode(image), texts)

    def score(
        self, encoded: PACLEncoding, vocabulary: Sequence[str], options: InferenceOptions
    ) -> torch.Tensor:
        """Class probabilities of one encoded image.

        Args:
            encoded: ``encode``'s output.
            vocabulary: K class names; names in ``background_names`` are background entries.
            options: ``seen_gamma`` γ is used.

        Returns:
            (K, H, W): softmax_k(cos · s − γ [seen]) over the non-background classes; background
            channels are 1 where the background rule fires (the other channels are 0 there) and 0
            elsewhere.
        """
        text_ids, fg_names = self.split_background(vocabulary)
        cosines = self.cosines(encoded, self.text_embeddings(fg_names))
        logits = self.calibration(options).apply(cosines * self.current_logit_scale(), fg_names)
        probs = logits.softmax(dim=0)
        if len(text_ids) == len(vocabulary):
            return probs
        out = probs.new_zeros(len(vocabulary), *probs.shape[1:])
        background = self.bg_rule(probs, cosines, self.bg_thresh)
        out[text_ids] = probs * (~background).to(out.dtype)
        bg_ids = [k for k in range(len(vocabulary)) if k not in set(text_ids)]
        out[bg_ids] = background.to(out.dtype)
        return out

    def segment(
        self,
        image: torch.Tensor,
        vocabulary: Sequence[str],
        options: Optional[InferenceOptions] = None,
    ) -> torch.Tensor:
        """``score`` of one image (3, H, W) uint8 / float RGB 0-255: (K, H, W)."""
        encoded = self.encode(self.preprocess_image({"image": image})[0])
        return self.score(encoded, vocabulary, self.resolve_options(options))
