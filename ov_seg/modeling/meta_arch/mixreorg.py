"""``MixReorg``: mixed patch reorganisation on a GroupViT-style encoder (Cai, Ren et al.,
ICCV 2023).

Training (caption datasets, ``INPUT.DATASET_MAPPER_NAME caption``):

1. **Contextual mixing.** The CLIP image tower's first ``CONTEXT_DEPTH`` blocks run on every image;
   their output tokens are mixed across tuples of ``NUM_MIX_IMAGES`` images (``losses/mixing.py``):
   each token keeps its position and its image's caption.
2. **Progressive mixing.** The first grouping stage's blocks run on the original and the mixed
   sequences; after each block a cross-attention lets every mixed token attend to the original
   tokens of its source image (the original sequence attends to itself, so both branches have the
   same layers).
3. **Mixing restoration.** The mixed tokens are scattered back to their source images (an exact
   inverse permutation), and the original, mixed and restored sequences go through the grouping
   neck.

Loss: ``ORIG_WEIGHT·L_nce(original) + REST_WEIGHT·L_nce(restored) + SEG_WEIGHT·L_seg(mixed)``, where
``L_nce`` is the symmetric image-caption InfoNCE on the projected average of the segment tokens, and
``L_seg`` classifies every mixed token into its source caption through the segments.

Inference runs the original branch only (mixing is a training-time transform: the same FLOPs as the
model trained without mixing) and classifies the groups GroupViT's way: every pixel takes its argmax
group; a group's class scores are its softmax over the vocabulary restricted to the image's top-k
classes, times the unrestricted softmax. A vocabulary entry named ``BACKGROUND_NAME`` is not scored
by text but gets the constant ``min(BG_THRESH, max group score)`` (GroupViT's background rule).

The text tower is CLIP's and stays frozen (the joint space is the text tower's). Sizes are read from
the built CLIP model.
"""

import logging
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.clip import TextClassifier, build_clip_from_cfg, clip_sizes
from ov_seg.modeling.heads.mixreorg_encoder import GroupingViT, token_to_segment
from ov_seg.modeling.losses.contrastive import clamped_logit_scale, info_nce
from ov_seg.modeling.losses.mixing import (
    MixPlan,
    make_mix_plan,
    mix_tokens,
    mixed_segmentation_loss,
    restore_tokens,
    tuple_mean,
)
from ov_seg.modeling.meta_arch.base import (
    InferenceOptions,
    PerImageSegmentor,
    SlidingWindow,
    default_test_vocabulary,
)

__all__ = ["MixReorg", "MixingConfig", "MixReorgLossConfig", "MixReorgTestConfig"]

logger = logging.getLogger(__name__)

# RESTORE_GROUP_TOKENS -> group tokens of the restored sequences,
# from (original group tokens, mixed group tokens, plan)
_RESTORE_GROUP_TOKENS = {
    "tuple_mean": lambda g_orig, g_mix, plan: tuple_mean(g_mix, plan),
    "original": lambda g_orig, g_mix, plan: g_orig,
}


@dataclass(frozen=True)
class MixingConfig:
    """How MixReorg mixes a training batch (``MODEL.MIXREORG``).

    Attributes:
        mixing: train with mixing (False: the original branch and L_orig only).
        num_mix_images: M, images per mixing tuple.
        mix_cell: c, mixing cell side in tokens.
        mix_shares: share of cells per tuple member; empty = uniform.
        restore_group_tokens: group tokens of the restored sequences, "tuple_mean" or "original".
        seg_negatives: captions L_seg classifies a mixed token among: "tuple" (its mixing tuple's,
            the paper) or "batch" (every caption of the batch).
    """

    mixing: bool = True
    num_mix_images: int = 2
    mix_cell: int = 1
    mix_shares: Tuple[float, ...] = ()
    restore_group_tokens: str = "tuple_mean"
    seg_negatives: str = "tuple"

    @classmethod
    def from_config(cls, mc) -> "MixingConfig":
        """From the ``MODEL.MIXREORG`` node."""
        return cls(
            mixing=mc.MIXING,
            num_mix_images=mc.NUM_MIX_IMAGES,
            mix_cell=mc.MIX_CELL,
            mix_shares=tuple(mc.MIX_SHARES),
            restore_group_tokens=mc.RESTORE_GROUP_TOKENS,
            seg_negatives=mc.SEG_NEGATIVES,
        )


@dataclass(frozen=True)
class MixReorgLossConfig:
    """MixReorg's loss settings (``MODEL.MIXREORG``).

    Attributes:
        hard_negatives: add the inputs' ``hard_negatives`` captions as extra text negatives of
            L_orig and L_rest.
        orig_weight, rest_weight, seg_weight: W_ORIG, W_REST, W_SEG.
        logit_scale_init: initial 1/τ of the learnable logit scale; max_logit_scale: its clamp.
        noun_weight: weight of the group-level multi-label noun-prompt loss (0 = off).
        noun_pool_temp: temperature of the softmax pooling of group-prompt similarities over the
            groups (0 = max).
    """

    hard_negatives: bool = False
    orig_weight: float = 1.0
    rest_weight: float = 1.0
    seg_weight: float = 1.0
    logit_scale_init: float = 1.0 / 0.07
    max_logit_scale: float = 100.0
    noun_weight: float = 0.0
    noun_pool_temp: float = 0.1

    @classmethod
    def from_config(cls, mc) -> "MixReorgLossConfig":
        """From the ``MODEL.MIXREORG`` node."""
        return cls(
            hard_negatives=mc.HARD_NEGATIVES,
            orig_weight=mc.ORIG_WEIGHT,
            rest_weight=mc.REST_WEIGHT,
            seg_weight=mc.SEG_WEIGHT,
            logit_scale_init=mc.LOGIT_SCALE_INIT,
            max_logit_scale=mc.LOGIT_SCALE_MAX,
            noun_weight=mc.NOUN_PROMPTS.WEIGHT,
            noun_pool_temp=mc.NOUN_PROMPTS.POOL_TEMP,
        )


@dataclass(frozen=True)
class MixReorgTestConfig:
    """MixReorg's inference settings (``MODEL.MIXREORG.TEST``).

    Attributes:
        topk_classes: group classification is restricted to the image's top-k classes (0 = off).
        bg_thresh: background threshold for a vocabulary entry named ``background_name``.
        background_name: the vocabulary name scored by the threshold instead of by text.
        slide_window, slide_stride: sliding windows in pixels (0 = whole image).
        soft_inference: pixels take the assignment-weighted mix of the groups' class scores
            instead of their argmax group's.
    """

    topk_classes: int = 5
    bg_thresh: float = 0.95
    background_name: str = "background"
    slide_window: int = 0
    slide_stride: int = 0
    soft_inference: bool = False

    @classmethod
    def from_config(cls, mc) -> "MixReorgTestConfig":
        """From the ``MODEL.MIXREORG`` node (its ``TEST`` sub-node)."""
        t = mc.TEST
        return cls(
            topk_classes=t.TOPK_CLASSES,
            bg_thresh=t.BG_THRESH,
            background_name=t.BACKGROUND_NAME,
            slide_window=t.SLIDE_WINDOW,
            slide_stride=t.SLIDE_STRIDE,
            soft_inference=t.SOFT_ASSIGNMENT,
        )


@META_ARCH_REGISTRY.register()
class MixReorg(PerImageSegmentor):
    """MixReorg meta-architecture (see module doc). Inputs are detectron2 dicts with ``image``
    (3, H, W) uint8 RGB; training inputs carry ``captions`` (list of str, one drawn per step) and,
    with noun prompts, ``nouns`` (the noun phrases of each caption, added by the caption mapper with
    the ``NOUN_PROMPTS`` extractor settings, ``ov_seg.data.caption_nouns``), test inputs a
    ``vocabulary`` (list of class names; default: the first test dataset's ``stuff_classes``)."""

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module,
        templates: Union[str, Sequence[str]],
        encoder: GroupingViT,
        mixing_config: MixingConfig = MixingConfig(),
        loss_config: MixReorgLossConfig = MixReorgLossConfig(),
        test_config: MixReorgTestConfig = MixReorgTestConfig(),
        default_vocabulary: Sequence[str] = (),
        seen_calibration: Optional[SeenCalibration] = None,
        memory_budget_mb: float = 0.0,
    ):
        """
        Args:
            clip_model: open_clip model whose image tower ``encoder`` took over (its ``visual`` is
                removed); the text tower encodes captions and class names, frozen.
            templates: prompt templates for class names, a set name or a list (``TextClassifier``).
            encoder: the ``GroupingViT`` image encoder.
            mixing_config: how training batches are mixed (``MixingConfig``).
            loss_config: the loss settings (``MixReorgLossConfig``).
            test_config: the inference settings (``MixReorgTestConfig``).
            default_vocabulary: class names for test inputs without a ``vocabulary`` field.
            seen_calibration: calibrated stacking of the seen names' logits at inference (the
                group logits and the image-level top-k ranking); None = off.
            memory_budget_mb: MiB of full-resolution output maps per image
                (``TEST.MEMORY_BUDGET_MB``; 0 = unbounded): larger ``sem_seg`` outputs become label
                maps (``ov_seg.modeling.postprocess.semantic_postprocess``).
        """
        num_mix_images = mixing_config.num_mix_images
        restore_group_tokens = mixing_config.restore_group_tokens
        seg_negatives = mixing_config.seg_negatives
        noun_weight = loss_config.noun_weight
        if num_mix_images < 1:
            raise ValueError(f"NUM_MIX_IMAGES must be >= 1, got {num_mix_images}")
        if restore_group_tokens not in _RESTORE_GROUP_TOKENS:
            raise KeyError(
                f"Unknown RESTORE_GROUP_TOKENS {restore_group_tokens!r}; known: "
                f"{', '.join(sorted(_RESTORE_GROUP_TOKENS))}"
            )
        if seg_negatives not in ("tuple", "batch"):
            raise ValueError(f"SEG_NEGATIVES must be 'tuple' or 'batch', got {seg_negatives!r}")
        super().__init__(
            seen_calibration=seen_calibration,
            default_vocabulary=default_vocabulary,
            memory_budget_mb=memory_budget_mb,
            background_names=(test_config.background_name,),
            size_divisibility=encoder.patch_size,
        )
        self.slide = SlidingWindow(test_config.slide_window, test_config.slide_stride)
        self.clip = clip_model
        self.clip.requires_grad_(False)
        self.text_classifier = TextClassifier(clip_model, templates)
        self.encoder = encoder
        self.mixing = mixing_config.mixing
        self.num_mix_images = num_mix_images
        self.mix_cell = mixing_config.mix_cell
        self.mix_shares = list(mixing_config.mix_shares)
        self.restore_group_tokens = restore_group_tokens
        self.seg_negatives = seg_negatives
        lc = loss_config
        self.hard_negatives = lc.hard_negatives
        self.orig_weight, self.rest_weight, self.seg_weight = (
            lc.orig_weight,
            lc.rest_weight,
            lc.seg_weight,
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(lc.logit_scale_init)).log())
        self.max_logit_scale = lc.max_logit_scale
        self.noun_weight = noun_weight
        self.noun_pool_temp = lc.noun_pool_temp
        self.topk_classes = test_config.topk_classes
        self.bg_thresh = test_config.bg_thresh
        self.background_name = test_config.background_name
        self.soft_inference = test_config.soft_inference

    @classmethod
    def from_config(cls, cfg):
        mc = cfg.MODEL.MIXREORG
        clip_model = build_clip_from_cfg(cfg)
        sizes = clip_sizes(clip_model)
        visual = clip_model.visual
        clip_model.visual = None  # the encoder takes the image tower over
        encoder = GroupingViT(
            visual=visual,
            embed_dim=sizes.embed_dim,
            context_depth=mc.CONTEXT_DEPTH,
            depths=mc.DEPTHS,
            num_group_tokens=mc.NUM_GROUP_TOKENS,
            progressive=mc.PROGRESSIVE,
            proj_hidden=mc.PROJ_HIDDEN,
            hard=mc.HARD_ASSIGNMENT,
            gumbel=mc.GUMBEL,
            gumbel_tau=mc.GUMBEL_TAU,
            assign_cosine_temperature=mc.ASSIGN_COSINE_TEMPERATURE,
            aligned_init=mc.ALIGNED_INIT,
            freeze_at=mc.FREEZE_AT,
        )
        return {
            "clip_model": clip_model,
            "templates": cfg.MODEL.CLIP.TEMPLATES,
            "encoder": encoder,
            "mixing_config": MixingConfig.from_config(mc),
            "loss_config": MixReorgLossConfig.from_config(mc),
            "test_config": MixReorgTestConfig.from_config(mc),
            "default_vocabulary": default_test_vocabulary(cfg),
            "seen_calibration": SeenCalibration(cfg),
            "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the frozen text tower never trains
        return self

    # ------------------------------------------------------------------ inputs
    def pick_captions(self, batched_inputs: List[Dict]) -> Tuple[List[str], List[str], List[int]]:
        """One caption per image, drawn at random among its own, and (with ``hard_negatives``) the
        hard-negative caption aligned with it (a random one when they are not aligned).

        Returns:
            the B captions, the hard negatives, and the index of each caption in its input's
            ``captions``.
        """
        texts, negatives, picked = [], [], []
        for i, x in enumerate(batched_inputs):
            k, caps = self.draw_caption(x, i)
            texts.append(caps[k])
            picked.append(k)
            negs = list(x.get("hard_negatives") or [])
            if self.hard_negatives and negs:
                negatives.append(negs[k] if len(negs) == len(caps) else negs[k % len(negs)])
        return texts, negatives, picked

    def caption_embeddings(
        self, batched_inputs: List[Dict]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Embed the captions of ``pick_captions``.

        Returns:
            (B, D) normalised caption embeddings; (M, D) normalised hard negatives or None.
        """
        texts, negatives, _ = self.pick_captions(batched_inputs)
        return self.encode_captions(texts, negatives)

    def encode_captions(
        self, texts: List[str], negatives: List[str]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, D) caption and (M, D) hard-negative embeddings (None without negatives)."""
        with torch.no_grad():
            emb = self.text_classifier.encode_texts(texts + negatives).to(self.device)
        return emb[: len(texts)], (emb[len(texts) :] if negatives else None)

    def noun_prompts(
        self, captions: Sequence[str], nouns: Sequence[Sequence[str]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """GroupViT's multi-label prompts: one noun of each caption in a random template.

        Args:
            captions: the B captions.
            nouns: the noun phrases of each caption (the inputs' ``nouns``).

        Returns:
            (B, D) normalised prompt embeddings (the caption's own when it has no noun) and the
            (B, B) bool multi-label targets: [b, c] = prompt c's noun is one of caption b's nouns.
        """
        templates = self.text_classifier.templates
        picked = [random.choice(n) if n else None for n in nouns]
        prompts = [
            random.choice(templates).format(p) if p is not None else c
            for p, c in zip(picked, captions)
        ]
        with torch.no_grad():
            emb = self.text_classifier.encode_texts(prompts).to(self.device)
        b = len(captions)
        targets = torch.eye(b, dtype=torch.bool, device=self.device)
        for i, own in enumerate(nouns):
            own = set(own)
            for j, p in enumerate(picked):
                if p is not None and p in own:
                    targets[i, j] = True
        return emb, targets

    def scale(self) -> torch.Tensor:
        """Contrastive logit scale exp(log s), clamped at ``max_logit_scale``."""
        return clamped_logit_scale(self.logit_scale, self.max_logit_scale)

    # ------------------------------------------------------------------ training
    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The loss dict of a caption batch (``branch_losses``)."""
        images = self.preprocess_images(batched_inputs)
        captions, negatives, picked = self.pick_captions(batched_inputs)
        texts, negatives = self.encode_captions(captions, negatives)
        nouns = None
        if self.noun_weight > 0:
            per_caption = [
                self.caption_nouns(x, k, i) for i, (x, k) in enumerate(zip(batched_inputs, picked))
            ]
            nouns = self.noun_prompts(captions, per_caption)
        return self.branch_losses(images.tensor, texts, negatives, nouns)

    def make_plan(self, batch_size: int, grid) -> MixPlan:
        """A random mixing of the batch (``make_mix_plan`` with the configured M, c, shares)."""
        return make_mix_plan(
            batch_size,
            grid,
            num_mix=self.num_mix_images,
            cell=self.mix_cell,
            shares=self.mix_shares or None,
            device=self.device,
        )

    def branch_outputs(
        self, images: torch.Tensor, plan: Optional[MixPlan] = None
    ) -> Dict[str, Dict[str, object]]:
        """Run the encoder's branches on normalised images (B, 3, H, W).

        Args:
            images: (B, 3, H, W).
            plan: the mixing of the batch; None = the original branch only.

        Returns:
            dict branch name ("orig", and with a plan "mixed", "restored") → the encoder's ``neck``
            output (``segments`` (B, G, d), ``assignments``); the mixed and restored branches are
            computed only when their loss weight is non-zero.
        """
        enc = self.encoder
        x, grid = enc.embed(images)
        x = enc.context(x)
        if plan is None:
            return {"orig": enc.neck(enc.progressive(enc.start_progressive(x)))}
        b, g = x.shape[0], enc.stages[0].num_tokens
        seq = torch.cat([enc.start_progressive(x), enc.start_progressive(mix_tokens(x, plan))])
        for i in range(enc.num_progressive_blocks):
            seq = enc.progressive_block(i, seq)
            p_orig, p_mix = seq[:b, g:], seq[b:, g:]
            # mixed queries in their source images' order attend to those images' original tokens
            q = torch.cat([p_orig, restore_tokens(p_mix, plan)])
            upd = enc.progressive_cross(i, q, torch.cat([p_orig, p_orig]))
            patches = torch.cat([upd[:b], mix_tokens(upd[b:], plan)])
            seq = torch.cat([seq[:, :g], patches], dim=1)
        seq_orig, seq_mix = seq[:b], seq[b:]
        branches = {"orig": seq_orig}
        if self.seg_weight:
            branches["mixed"] = seq_mix
        if self.rest_weight:
            groups = _RESTORE_GROUP_TOKENS[self.restore_group_tokens](
                seq_orig[:, :g], seq_mix[:, :g], plan
            )
            branches["restored"] = torch.cat([groups, restore_tokens(seq_mix[:, g:], plan)], dim=1)
        names = list(branches)
        out = enc.neck(torch.cat([branches[n] for n in names]))
        return {
            n: {
                "segments": out["segments"][k * b : (k + 1) * b],
                "assignments": [a[k * b : (k + 1) * b] for a in out["assignments"]],
            }
            for k, n in enumerate(names)
        }

    def image_embedding(self, segments: torch.Tensor) -> torch.Tensor:
        """(B, G, d) segment tokens → (B, D) projected average (not normalised)."""
        return self.encoder.project(segments.mean(dim=1))

    def group_noun_loss(
        self, segments: torch.Tensor, prompts: torch.Tensor, targets: torch.Tensor, scale
    ) -> torch.Tensor:
        """Group-level multi-label InfoNCE between images and noun prompts.

        An image's score for a prompt pools the cosine similarities of its groups to the prompt
        (softmax over the groups at ``noun_pool_temp``, or max); every image is contrasted with all
        prompts of the batch and every prompt with all images, the positives being the prompts
        whose noun the image's caption names (GroupViT's multi-label loss, scored per group).

        Args:
            segments: (B, G, d) segment tokens.
            prompts: (B, D) noun-prompt embeddings.
            targets: (B, B) bool, [image, prompt] positives (the diagonal included).
            scale: the logit scale.
        """
        z = F.normalize(self.encoder.project(segments), dim=-1)
        sim = torch.einsum("bgd,cd->bcg", z, F.normalize(prompts, dim=-1))  # (B, B, G)
        if self.noun_pool_temp > 0:
            sim = ((sim / self.noun_pool_temp).softmax(dim=-1) * sim).sum(dim=-1)
        else:
            sim = sim.max(dim=-1).values
        logits = sim * scale
        neg = torch.finfo(logits.dtype).min
        i2t = torch.logsumexp(logits.masked_fill(~targets, neg), 1) - torch.logsumexp(logits, 1)
        t2i = torch.logsumexp(logits.masked_fill(~targets, neg), 0) - torch.logsumexp(logits, 0)
        return -(i2t.mean() + t2i.mean()) / 2

    def branch_losses(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        negatives: Optional[torch.Tensor] = None,
        nouns: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Loss dict for normalised images (B, 3, H, W), their caption embeddings (B, D),
        optional hard-negative caption embeddings (M, D) (extra negatives of L_orig and L_rest)
        and optional noun prompts ``(embeddings (B, D), targets (B, B))`` (``noun_prompts``) of the
        group-level noun loss on the original and restored branches."""
        b = images.shape[0]
        grid = (
            images.shape[-2] // self.encoder.patch_size,
            images.shape[-1] // self.encoder.patch_size,
        )
        plan = self.make_plan(b, grid) if self.mixing else None
        outs = self.branch_outputs(images, plan)
        scale = self.scale()
        losses = {
            "loss_orig": self.orig_weight
            * info_nce(
                self.image_embedding(outs["orig"]["segments"]), texts, scale, b_negatives=negatives
            )
        }
        if "restored" in outs:
            emb = self.image_embedding(outs["restored"]["segments"])
            losses["loss_rest"] = self.rest_weight * info_nce(
                emb, texts, scale, b_negatives=negatives
            )
        if "mixed" in outs:
            mixed = outs["mixed"]
            losses["loss_seg"] = self.seg_weight * mixed_segmentation_loss(
                self.encoder.project(mixed["segments"]),
                token_to_segment(mixed["assignments"]),
                texts,
                plan,
                scale,
                batch_negatives=self.seg_negatives == "batch",
            )
        if nouns is not None and self.noun_weight > 0:
            for name in ("orig", "restored"):
                if name in outs:
                    losses[f"loss_noun_{name}"] = self.noun_weight * self.group_noun_loss(
                        outs[name]["segments"], nouns[0], nouns[1], scale
                    )
        return losses

    # ------------------------------------------------------------------ inference
    def class_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K, D) normalised text embeddings of ``vocabulary`` (cached per vocabulary)."""
        return self.text_embeddings(vocabulary)

    def encode_image(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The grouping encoder's outputs (``segments``, ``assignments``, ``grid``) of one
        normalised image (3, H, W); independent of the vocabulary and of the calibration."""
        return self.encoder(image[None])

    def encode(self, image: torch.Tensor) -> List[Tuple[Tuple[int, int, int, int], Dict]]:
        """``encode_image`` of one normalised image (3, H, W), or of each of its sliding windows.

        Returns:
            [((top, left, height, width) of the window, the encoder's outputs on the window padded
            to a multiple of the patch size)]; one entry covering the image without windows.
        """
        h, w = image.shape[-2:]
        if not self.slide.active(h, w):
            return [((0, 0, h, w), self.encode_image(image))]
        out = []
        for y, x in self.slide.boxes(h, w):
            crop = image[:, y : y + self.slide.window, x : x + self.slide.window]
            ch, cw = crop.shape[-2:]
            pad_h, pad_w = -ch % self.encoder.patch_size, -cw % self.encoder.patch_size
            out.append(((y, x, ch, cw), self.encode_image(F.pad(crop, (0, pad_w, 0, pad_h)))))
        return out

    def encoded_scores(
        self,
        out: Dict[str, torch.Tensor],
        size: Tuple[int, int],
        class_embeds: torch.Tensor,
        class_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Pixel class scores of one encoded (padded) image or window.

        Args:
            out: ``encode_image``'s output.
            size: (H, W) of the encoded image, multiples of the patch size.
            class_embeds: (K, D) normalised class embeddings.
            class_bias: (K,) added to the group logits and to the image-level logits that rank
                the top-k classes (seen-class calibration); None = 0.

        Returns:
            (K, H, W) scores: every pixel holds the class scores of its argmax group.
        """
        h, w = out["grid"]
        assign = token_to_segment(out["assignments"])[0]  # (N, G)
        assign = assign.t().reshape(1, -1, h, w)
        assign = F.interpolate(assign, size=tuple(size), mode="bilinear", align_corners=False)
        if self.soft_inference:
            one_hot = assign[0]
        else:
            one_hot = (
                F.one_hot(assign[0].argmax(dim=0), assign.shape[1])
                .permute(2, 0, 1)
                .to(assign.dtype)
            )
        segments = out["segments"][0]
        group_embeds = F.normalize(self.encoder.project(segments), dim=-1)  # (G, D)
        image_embed = F.normalize(self.image_embedding(segments[None])[0], dim=-1)
        scale = self.scale()
        group_logits = group_embeds @ class_embeds.t() * scale  # (G, K)
        image_logits = image_embed @ class_embeds.t() * scale  # (K,)
        if class_bias is not None:
            group_logits, image_logits = group_logits + class_bias, image_logits + class_bias
        affinity = group_logits.softmax(dim=-1)
        k = min(self.topk_classes, class_embeds.shape[0])
        if k > 0:
            top = image_logits.topk(k).indices
            keep = torch.zeros(class_embeds.shape[0], dtype=torch.bool, device=self.device)
            keep[top] = True
            affinity = group_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1) * affinity
        return torch.einsum("gk,ghw->khw", affinity, one_hot)

    def segment_scores(
        self,
        image: torch.Tensor,
        class_embeds: torch.Tensor,
        class_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``encoded_scores`` of one normalised image (3, H, W) (H, W multiples of the patch size),
        encoded whole: (K, H, W)."""
        return self.encoded_scores(
            self.encode_image(image), image.shape[-2:], class_embeds, class_bias
        )

    def window_scores(
        self,
        encoded: List[Tuple[Tuple[int, int, int, int], Dict]],
        class_embeds: torch.Tensor,
        class_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Scores of an ``encode`` output: its one window's, or the windows' averaged where they
        overlap. Returns (K, H, W)."""
        if len(encoded) == 1 and encoded[0][0][:2] == (0, 0):
            (_, _, h, w), out = encoded[0]
            return self.encoded_scores(out, (h, w), class_embeds, class_bias)
        h = max(y + ch for (y, _, ch, _), _ in encoded)
        w = max(x + cw for (_, x, _, cw), _ in encoded)
        scores = class_embeds.new_zeros(class_embeds.shape[0], h, w)
        count = class_embeds.new_zeros(1, h, w)
        p = self.encoder.patch_size
        for (y, x, ch, cw), out in encoded:
            padded = (ch + (-ch % p), cw + (-cw % p))
            s = self.encoded_scores(out, padded, class_embeds, class_bias)
            scores[:, y : y + ch, x : x + cw] += s[:, :ch, :cw]
            count[:, y : y + ch, x : x + cw] += 1
        return scores / count

    def score(
        self, encoded: List, vocabulary: Sequence[str], options: InferenceOptions
    ) -> torch.Tensor:
        """(K, H, W) class scores of an ``encode`` output; a background entry gets the constant
        ``min(bg_thresh, max score)`` (GroupViT)."""
        text_ids, names = self.split_background(vocabulary)
        calibration = self.calibration(options)
        bias = calibration.bias(names, self.device) if calibration.enabled else None
        scores = self.window_scores(encoded, self.text_embeddings(names), bias)
        if len(text_ids) == len(vocabulary):
            return scores
        full = scores.new_zeros(len(vocabulary), *scores.shape[-2:])
        full[text_ids] = scores
        bg = [k for k in range(len(vocabulary)) if k not in set(text_ids)]
        full[bg] = min(self.bg_thresh, float(scores.max()))
        return full
