"""PACL's patch-aligned compatibility φ (Mukhoti et al., CVPR 2023), as pure functions.

For an image x with patch embeddings V = (v_1 .. v_N) and a text embedding t:

    s_i(x, y) = cos(v_i, t)     a_i = softmax_i(s_i / τ_p)     φ(x, y) = cos(Σ_i a_i v_i, t)

φ depends on the text, so every image-text pair needs its own attention pooling.
``pacl_compatibility`` computes the full (B, T) matrix with einsums over chunks of texts; with
``checkpoint=True`` each chunk is recomputed in the backward pass, so the autograd memory is that of
one chunk, O(B · chunk · (N + D)), instead of O(B · T · (N + D)) for the whole matrix.
"""

import zlib
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .contrastive import all_gather_with_grad

__all__ = ["pacl_compatibility", "pacl_info_nce", "patch_text_cosine", "text_group_ids"]


def text_group_ids(keys, device=None) -> torch.Tensor:
    """(T,) int64 ids, equal for equal keys (strings, or tuples such as a caption's noun set):
    stable across processes (CRC-32 of the key's text), so workers can compare gathered ids."""
    out = []
    for key in keys:
        text = key if isinstance(key, str) else "\x1f".join(sorted(str(k) for k in key))
        out.append(zlib.crc32(text.strip().lower().encode("utf-8")))
    return torch.tensor(out, dtype=torch.long, device=device)


def _exclude_same_group(
    logits: torch.Tensor, row_groups: torch.Tensor, col_groups: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``logits`` (R, C) with -inf where a column carries the row's group but is not its target: a
    text equal to the positive is not a negative (and an image whose text is equal is not one
    either)."""
    same = row_groups[:, None] == col_groups[None, :]
    same[torch.arange(len(targets), device=logits.device), targets] = False
    return logits.masked_fill(same, float("-inf"))


def _phi_chunk(
    patches: torch.Tensor,
    patches_hat: torch.Tensor,
    texts_hat: torch.Tensor,
    mask_bias: Optional[torch.Tensor],
    inv_temp: float,
) -> torch.Tensor:
    """φ for all images against one chunk of texts.

    Args:
        patches: (B, N, D) patch embeddings v_i.
        patches_hat: (B, N, D) the same, L2-normalised.
        texts_hat: (C, D) L2-normalised text embeddings.
        mask_bias: (B, 1, N) 0 for valid patches and -inf for padding, or None.
        inv_temp: 1 / τ_p.

    Returns:
        (B, C) φ(x_b, y_c).
    """
    sims = torch.einsum("bnd,cd->bcn", patches_hat, texts_hat) * inv_temp  # (B, C, N)
    if mask_bias is not None:
        sims = sims + mask_bias
    attn = sims.softmax(dim=-1)
    pooled = torch.einsum("bcn,bnd->bcd", attn, patches)  # (B, C, D)
    return torch.einsum("bcd,cd->bc", F.normalize(pooled, dim=-1), texts_hat)


def pacl_compatibility(
    patches: torch.Tensor,
    texts: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 64,
    patch_mask: Optional[torch.Tensor] = None,
    checkpoint: bool = True,
) -> torch.Tensor:
    """PACL compatibility φ(x_b, y_c) for all image-text pairs.

    Args:
        patches: (B, N, D) patch embeddings V (not necessarily normalised).
        texts: (T, D) text embeddings (not necessarily normalised).
        temperature: τ_p of the patch softmax (the paper's form: 1.0).
        chunk_size: texts per chunk (<= 0: all texts in one chunk).
        patch_mask: optional (B, N) bool, True for patches that belong to the image (False: padding,
            excluded from the softmax). Every image needs at least one valid patch.
        checkpoint: recompute each chunk in backward (memory of one chunk) when gradients are
            needed.

    Returns:
        Φ of shape (B, T), values in [-1, 1] (rows: images, columns: texts).

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature or an image without valid
            patches.
    """
    if patches.dim() != 3 or texts.dim() != 2 or patches.shape[-1] != texts.shape[-1]:
        raise ValueError(
            "expected patches (B, N, D) and texts (T, D) with the same D, got "
            f"{tuple(patches.shape)} and {tuple(texts.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"the patch softmax temperature must be positive, got {temperature}")
    mask_bias = None
    if patch_mask is not None:
        if patch_mask.shape != patches.shape[:2]:
            raise ValueError(
                f"patch_mask must be (B, N) = {tuple(patches.shape[:2])}, "
                f"got {tuple(patch_mask.shape)}"
            )
        if not bool(patch_mask.any(dim=1).all()):
            raise ValueError("every image needs at least one valid patch in patch_mask")
        mask_bias = torch.zeros(patch_mask.shape, dtype=patches.dtype, device=patches.device)
        mask_bias = mask_bias.masked_fill(~patch_mask, float("-inf"))[:, None, :]
    patches_hat = F.normalize(patches, dim=-1)
    texts_hat = F.normalize(texts, dim=-1)
    num_texts = texts.shape[0]
    step = num_texts if chunk_size <= 0 else chunk_size
    use_ckpt = (
        checkpoint and torch.is_grad_enabled() and (patches.requires_grad or texts.requires_grad)
    )
    cols = []
    for start in range(0, max(num_texts, 1), step):
        args = (patches, patches_hat, texts_hat[start : start + step], mask_bias, 1.0 / temperature)
        if use_ckpt:
            cols.append(_checkpoint(_phi_chunk, *args, use_reentrant=False))
        else:
            cols.append(_phi_chunk(*args))
    return torch.cat(cols, dim=1)


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def pacl_info_nce(
    patches: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
    *,
    temperature: float = 1.0,
    chunk_size: int = 64,
    patch_mask: Optional[torch.Tensor] = None,
    checkpoint: bool = True,
    text_groups: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """L_PACL: symmetric InfoNCE on the PACL score matrix Φ_bc = φ(x_b, y_c) of pairs (x_b, y_b).

    ``info_nce`` in ``contrastive.py`` scores pairs by a dot product of two embeddings; here every
    score needs its own text-conditioned pooling, so the loss is taken on Φ itself::

        L = ½ [ CE(s · Φ, diag) + CE(s · Φᵀ, diag) ]

    With several workers, the local images are scored against the texts of all workers (image → text
    rows) and the patches of all workers (gathered with gradient) against the local texts (text →
    image columns): 2 · B_local · B_global pairs per worker instead of B_global².

    Args:
        patches: (B, N, D) patch embeddings of the local images.
        texts: (B, D) text embeddings; texts[b] is the positive of image b.
        logit_scale: s = 1/τ (float or 0-dim tensor, already exponentiated and clamped).
        temperature, chunk_size, patch_mask, checkpoint: as in ``pacl_compatibility``.
        text_groups: optional (B,) int64 (``text_group_ids``): texts of one group say the same
            thing (the same noun in two images' prompts), so another pair of the group is not a
            negative: it is left out of both softmaxes. None: every other pair is a negative.

    Returns:
        the scalar loss.
    """
    if texts.dim() != 2 or patches.dim() != 3 or texts.shape[0] != patches.shape[0]:
        raise ValueError(
            f"patches (B, N, D) and texts (B, D) must pair up, got {tuple(patches.shape)} and "
            f"{tuple(texts.shape)}"
        )
    kwargs = {"temperature": temperature, "chunk_size": chunk_size, "checkpoint": checkpoint}
    world, rank = _world()
    local = patches.shape[0]
    targets = torch.arange(local, device=patches.device)
    if text_groups is not None and text_groups.shape != (local,):
        raise ValueError(f"text_groups must be ({local},), got {tuple(text_groups.shape)}")
    if world == 1:
        logits = logit_scale * pacl_compatibility(patches, texts, patch_mask=patch_mask, **kwargs)
        if text_groups is not None:
            logits = _exclude_same_group(logits, text_groups, text_groups, targets)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    # texts come from a frozen tower: gathered without gradient is enough for the rows
    all_texts = all_gather_with_grad(texts.detach())
    all_patches = all_gather_with_grad(patches)
    all_mask = None if patch_mask is None else all_gather_with_grad(patch_mask.float()) > 0.5
    targets = targets + rank * local
    rows = logit_scale * pacl_compatibility(patches, all_texts, patch_mask=patch_mask, **kwargs)
    cols = logit_scale * pacl_compatibility(all_patches, texts, patch_mask=all_mask, **kwargs).t()
    if text_groups is not None:  # rows (B, B_g) and cols (B, B_g): local texts / images
        gathered = [torch.empty_like(text_groups) for _ in range(world)]
        dist.all_gather(gathered, text_groups)  # int64 ids (no gradient needed)
        all_groups = torch.cat(gathered)
        rows = _exclude_same_group(rows, text_groups, all_groups, targets)
        cols = _exclude_same_group(cols, text_groups, all_groups, targets)
    return (F.cross_entropy(rows, targets) + F.cross_entropy(cols, targets)) / 2


def patch_text_cosine(patches: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per-patch class scores s_{i,k} = cos(v_i, t_k) (PACL inference).

    Args:
        patches: (B, N, D) patch embeddings.
        texts: (K, D) class embeddings.

    Returns:
        (B, K, N) cosines.
    """
    return torch.einsum("bnd,kd->bkn", F.normalize(patches, dim=-1), F.normalize(texts, dim=-1))
