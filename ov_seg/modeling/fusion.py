"""OVSeg's fusion of the two stages, as pure functions on tensors.

Per proposal q and class c (OVSeg, "geometric ensemble")::

    p_q(c) = p_proposal,q(c) ** (1 - λ) · p_clip,q(c) ** λ

with ``p_proposal`` the softmax of the proposal head without its "no object" column (not
renormalised) and ``p_clip`` the softmax over the vocabulary of ``logit_scale · cos(masked
crop, class name)``. A proposal whose mask is empty after binarisation has no crop: its ``p_clip``
is 1 for every class, so only the proposal term remains. λ = 0 is the proposal head alone;
λ = 1 is CLIP alone, and then proposals without a crop carry no class information and are dropped
(OVSeg's CLIP-only path).

When the evaluation vocabulary holds names the proposal head was trained on ("seen") and others,
OVSeg's released code (datasets with a ``trainable_flag``) gives the seen names their own CLIP
exponent, λ_s = 1 − λ::

    p_q(c) = p_proposal,q(c) ** (1 - λ_c) · p_clip,q(c) ** λ_c,   λ_c = λ_s if c is seen else λ

so the head, which knows the seen names, weighs more on them and CLIP more on the others
(``geometric_ensemble(..., seen=, seen_weight=)``; λ_s = λ is the uniform ensemble above). The
semantic output is ``Σ_q p_q(c) · σ(m_q)``; the panoptic output
reuses the MaskFormer merge on per-proposal class distributions built by ``panoptic_class_logits``.
"""

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "proposal_class_probs",
    "clip_class_probs",
    "geometric_ensemble",
    "calibrate_query_probs",
    "semantic_scores",
    "panoptic_class_logits",
    "with_background_name",
]


def proposal_class_probs(class_logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the proposal head: softmax over K + 1, "no object" column dropped.

    Args:
        class_logits: (Q, K + 1) logits, last column "no object".

    Returns:
        (Q, K) probabilities (rows sum to 1 − p(no object)).
    """
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(
            f"class_logits must be (Q, K + 1) with K >= 1, got {tuple(class_logits.shape)}"
        )
    return class_logits.float().softmax(-1)[:, :-1]


def clip_class_probs(clip_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CLIP class probabilities: softmax over the vocabulary (no void); rows of proposals without a
    crop are set to 1 (the neutral element of the geometric ensemble).

    Args:
        clip_logits: (Q, K) logits of the masked crops (any value in rows that are not ``valid``).
        valid: (Q,) bool, True where the mask gave a crop.

    Returns:
        (Q, K) probabilities.
    """
    if clip_logits.dim() != 2 or valid.shape != clip_logits.shape[:1]:
        raise ValueError(
            "clip_logits (Q, K) and valid (Q,) expected, got "
            f"{tuple(clip_logits.shape)}, {tuple(valid.shape)}"
        )
    probs = clip_logits.float().softmax(-1)
    return torch.where(valid.view(-1, 1).to(probs.device), probs, torch.ones_like(probs))


def geometric_ensemble(
    proposal_probs: Optional[torch.Tensor],
    clip_probs: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    weight: float,
    seen: Optional[torch.Tensor] = None,
    seen_weight: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """p = p_proposal^(1 − λ) · p_clip^λ, with OVSeg's handling of proposals without a crop, and
    optionally another λ for the seen names (see the module doc).

    Args:
        proposal_probs: (Q, K) from ``proposal_class_probs``; may be None when λ = 1.
        clip_probs: (Q, K) from ``clip_class_probs`` (rows of invalid proposals = 1); may be None
            when λ = 0.
        valid: (Q,) bool, proposals whose mask gave a crop; may be None when λ = 0.
        weight: λ in [0, 1].
        seen: (K,) bool, the names the proposal head was trained on; None = none.
        seen_weight: λ_s in [0, 1], the CLIP exponent of the ``seen`` names; None = λ (the
            uniform ensemble). With λ_s ≠ λ both branches are needed and every proposal takes
            part; a proposal without a crop keeps p_proposal^(1 − λ_c), and no score for a class
            with λ_c = 1.

    Returns:
        ``probs`` (Q, K) and ``keep`` (Q,) bool, the proposals that take part in the outputs: all of
        them for λ < 1; for λ = 1 (CLIP only; or λ_c = 1 for every class) the valid ones (the others
        have no class scores).

    Raises:
        ValueError: λ outside [0, 1], a branch missing for the λ asked, or shapes that differ.
    """
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"ensemble weight λ must be in [0, 1], got {weight}")
    lam, text = weight, f"λ = {weight}"  # the CLIP exponent: one for all classes, or (K,)
    if seen_weight is not None and seen is not None:
        seen_weight = float(seen_weight)
        if not 0.0 <= seen_weight <= 1.0:
            raise ValueError(f"seen-class ensemble weight λ_s must be in [0, 1], got {seen_weight}")
        num_classes = (proposal_probs if proposal_probs is not None else clip_probs).shape[-1]
        if seen.shape != (num_classes,):
            raise ValueError(f"seen must be ({num_classes},) bool, got {tuple(seen.shape)}")
        if seen_weight != weight and bool(seen.any()):
            lam = torch.full((num_classes,), weight, dtype=torch.float32)
            lam[seen.cpu().bool()] = seen_weight
            text = f"λ = {weight}, λ_s = {seen_weight} (both branches)"
    per_class = isinstance(lam, torch.Tensor)
    lowest, highest = (float(lam.min()), float(lam.max())) if per_class else (lam, lam)
    if lowest < 1.0 and proposal_probs is None:
        raise ValueError(
            f"ensemble weight {text} < 1 needs class scores from the proposal source "
            "(a proposal head with classes); set MODEL.TWO_STAGE.ENSEMBLE_WEIGHT 1.0 (CLIP only)"
        )
    if highest > 0.0 and (clip_probs is None or valid is None):
        raise ValueError(f"ensemble weight {text} > 0 needs the CLIP probabilities and valid flags")
    if highest == 0.0:
        return proposal_probs, torch.ones(
            proposal_probs.shape[0], dtype=torch.bool, device=proposal_probs.device
        )
    valid = valid.to(device=clip_probs.device, dtype=torch.bool)
    if lowest == 1.0:  # CLIP alone: proposals without a crop have no class scores and drop out
        if per_class:
            return torch.where(valid.view(-1, 1), clip_probs, torch.zeros_like(clip_probs)), valid
        return clip_probs, valid
    if not proposal_probs.shape == clip_probs.shape == (valid.shape[0], clip_probs.shape[-1]):
        raise ValueError(
            f"shapes differ: proposal {tuple(proposal_probs.shape)}, CLIP "
            f"{tuple(clip_probs.shape)}, valid {tuple(valid.shape)}"
        )
    clip = torch.where(valid.view(-1, 1), clip_probs, torch.ones_like(clip_probs))
    if per_class:
        lam = lam.to(device=clip.device, dtype=clip.dtype)
    probs = proposal_probs.to(clip.dtype).pow(1.0 - lam) * clip.pow(lam)
    if highest == 1.0:  # CLIP alone for some classes: no score there from a proposal without a crop
        probs = torch.where(~valid.view(-1, 1) & (lam == 1.0), torch.zeros_like(probs), probs)
    return probs, torch.ones_like(valid)


def calibrate_query_probs(probs: torch.Tensor, class_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Calibrated stacking of per-proposal class scores: each row's class distribution becomes the
    one of ``log p + bias`` (as ``softmax(logits + bias)`` would be), and its total mass (the
    proposal head's 1 − p(no object), or 1 for CLIP) is kept, so the weight of a proposal in the
    semantic sum does not change::

        p'_q(c) = p_q(c) · e^{b_c} · Σ_k p_q(k) / Σ_k p_q(k) · e^{b_k}

    Args:
        probs: (Q, K) fused class probabilities (``geometric_ensemble``).
        class_bias: (K,) log-space bias (``SeenCalibration.bias``: −γ for seen names), or None.

    Returns:
        (Q, K) calibrated probabilities (``probs`` itself when ``class_bias`` is None).
    """
    if class_bias is None:
        return probs
    if class_bias.shape != probs.shape[-1:]:
        raise ValueError(
            f"class_bias of shape {tuple(class_bias.shape)} for {probs.shape[-1]} classes"
        )
    scaled = probs * class_bias.to(probs).exp()
    mass = probs.sum(-1, keepdim=True)
    return scaled * (mass / scaled.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny))


def semantic_scores(
    probs: torch.Tensor, masks: torch.Tensor, keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """semseg[c] = Σ_q p_q(c) · σ(m_q) over the kept proposals.

    Args:
        probs: (Q, K) class probabilities. masks: (Q, H, W) mask probabilities σ(m_q).
        keep: optional (Q,) bool.

    Returns:
        (K, H, W) scores (zeros when no proposal is kept).
    """
    if probs.shape[0] != masks.shape[0]:
        raise ValueError(f"{probs.shape[0]} class rows but {masks.shape[0]} masks")
    if keep is not None:
        probs, masks = probs[keep], masks[keep]
    return torch.einsum("qc,qhw->chw", probs.to(masks.dtype), masks)


def panoptic_class_logits(
    probs: torch.Tensor,
    objectness: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Per-proposal log-probabilities over K classes + "no object", for the MaskFormer panoptic
    merge.

    The class distribution of a proposal is its fused ``probs`` renormalised over the vocabulary,
    scaled by its objectness o_q; "no object" gets 1 − o_q; proposals not kept are "no object". The
    merge takes a softmax of these logits, which gives back exactly these probabilities.

    Args:
        probs: (Q, K) fused class scores (any positive scale). objectness: (Q,) in [0, 1].
        keep: optional (Q,) bool.

    Returns:
        (Q, K + 1) log-probabilities.
    """
    if objectness.shape != probs.shape[:1]:
        raise ValueError(
            f"objectness must be (Q,) = ({probs.shape[0]},), got {tuple(objectness.shape)}"
        )
    probs = probs.float()
    obj = objectness.float().clamp(0.0, 1.0).to(probs.device)
    if keep is not None:
        obj = torch.where(keep.to(probs.device), obj, torch.zeros_like(obj))
    classes = probs / probs.sum(-1, keepdim=True).clamp_min(eps)
    full = torch.cat([classes * obj[:, None], (1.0 - obj)[:, None]], dim=1)
    return full.clamp_min(eps).log()


def with_background_name(vocabulary: Sequence[str], background_name: str) -> List[str]:
    """OVSeg's single-class rule: classification is a softmax over the vocabulary, so a vocabulary
    of one name gets a background name appended (``["cat"]`` → ``["cat", "others"]``). Longer
    vocabularies are returned unchanged.

    Raises:
        ValueError: empty vocabulary, or a single name equal to the background name.
    """
    vocabulary = list(vocabulary)
    if not vocabulary:
        raise ValueError("empty vocabulary: give at least one class name")
    if len(vocabulary) == 1:
        if vocabulary[0] == background_name:
            raise ValueError(f"the only class name is the background name {background_name!r}")
        vocabulary.append(background_name)
    return vocabulary
