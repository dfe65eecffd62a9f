"""Open-vocabulary text classifier: prompt-ensembled CLIP text embeddings of class names, cached.

Each name goes through every template of a template set; the normalised embeddings are averaged and
re-normalised. The classifier of a vocabulary is computed once per (vocabulary, template set) and
cached; the text tower is frozen and run in eval mode. ``encode_texts`` embeds raw texts (captions,
nouns) in batches.

Exact speed-ups (same embeddings as ``model.encode_text`` at the full context, within float
rounding):

- prompts are encoded at the length of their longest tokenised prompt, not the model's context
  length (77): the text tower of a CLIP is causal (each position attends to itself and the positions
  before it) and pools the end-of-text token, so the padding after it never reaches the output
  (``encode_tokens``; towers that are not causal or pool otherwise fall back to ``encode_text``);
- prompts are sorted by length and batched, so each batch runs at its own longest prompt;
- the prompts of one template share their first tokens ("<start> a photo of a"): the causal tower
  computes those positions once per template and runs only the rest of each prompt, attending to
  the shared keys and values (``encode_shared_prefix``; about half of the positions of the ViLD
  prompts);
- classifiers built on the same CLIP share their caches (``share_cache``), and an optional
  ``TextEmbeddingCache`` keeps vocabularies on disk across processes.
"""

from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from .text_cache import TextEmbeddingCache, text_tower_hash
from .text_tower import text_tower_modules, text_tower_parameters
from .tokenizer import CLIPTokenizer, build_tokenizer

__all__ = [
    "TextClassifier",
    "TEMPLATE_SETS",
    "resolve_templates",
    "text_tower_modules",
    "text_tower_parameters",
    "encode_shared_prefix",
    "encode_tokens",
    "shared_prefix_length",
    "token_lengths",
]

# The 14 ViLD templates: OVSeg's default prompt set; its released code uses all 14 (VILD_PROMPT of
# open_vocab_seg/modeling/clip_adapter/text_template.py, TEXT_TEMPLATES "vild" in both released
# configs).
VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# name -> templates ("{}" is replaced by the class name). "imagenet": CLIP's 80 ImageNet templates.
TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "vild": VILD_TEMPLATES,
    "imagenet": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    # CLIP's 7-template ensemble as quoted for PACL (its class embeddings and prompt augmentation)
    "clip7": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "{} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
    "single": ("a photo of a {}.",),
    # the toy world's caption style (object-centric captions: "a photo of a red star"); every token
    # of these templates occurs in the toy world's training captions
    "toyworld": ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}"),
}


def resolve_templates(templates: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """A template-set name (``TEMPLATE_SETS``) or an explicit sequence of templates -> tuple of
    templates.

    Raises:
        KeyError: unknown set name. ValueError: empty set or a template without "{}".
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise KeyError(
                f"Unknown template set {templates!r}; known: {', '.join(sorted(TEMPLATE_SETS))}"
            )
        templates = TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"templates must be a non-empty sequence of strings containing '{{}}': {templates}"
        )
    return templates


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids (zero padding after the end token) -> (N,) used length (last non-zero id +
    1; id 0 is also a BPE token, but the end token always follows it)."""
    nonzero = tokens != 0
    ar = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return torch.where(nonzero, ar, 0).amax(dim=1).clamp_min(1)


def _trimmable(clip_model: nn.Module) -> bool:
    """Whether the text tower can run on a shorter context with the same output: an open_clip
    ``CLIP`` whose text transformer has a causal mask and pools the end-of-text token."""
    mask = getattr(clip_model, "attn_mask", None)
    if not (
        isinstance(getattr(clip_model, "positional_embedding", None), torch.Tensor)
        and isinstance(mask, torch.Tensor)
        and getattr(clip_model, "text_pool_type", None) in ("argmax", "eos")
        and hasattr(clip_model, "token_embedding")
        and hasattr(clip_model, "transformer")
    ):
        return False
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), causal)) and bool((mask[~causal] == 0).all())


def encode_tokens(clip_model: nn.Module, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """``clip_model.encode_text(tokens)``, run at the batch's longest used length when exact.

    The text tower is causal and pools the end-of-text token (at or before the used length), so the
    positions after it are never read: dropping them (and the matching rows / columns of the
    positional embedding and the causal mask) gives the same embeddings.

    Args:
        clip_model: an open_clip model.
        tokens: (N, L) token ids at the model's context length.
        trim: False = always the full context (the reference path).

    Returns:
        (N, D) embeddings, not normalised.
    """
    if not trim or not _trimmable(clip_model):
        return clip_model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    length = int(token_lengths(tokens).max())
    tokens = tokens[:, :length]
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast_dtype)
    x = x + clip_model.positional_embedding[:length].to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])
    x = clip_model.ln_final(x)
    x = text_global_pool(
        x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None)
    )
    projection = clip_model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


def _prefix_sharable(clip_model: nn.Module) -> bool:
    """Whether ``encode_shared_prefix`` reproduces the tower: a trimmable tower (causal, pooling
    the end token) of plain open_clip residual blocks with packed, batch-first self-attention."""
    from open_clip.transformer import ResidualAttentionBlock

    if not _trimmable(clip_model) or not getattr(clip_model.transformer, "batch_first", False):
        return False
    for block in clip_model.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (
            type(block) is not ResidualAttentionBlock
            or hasattr(block, "ln_1_kv")
            or type(attn) is not nn.MultiheadAttention
            or not (attn.batch_first and attn._qkv_same_embed_dim)
            or attn.in_proj_bias is None
        ):
            return False
    return True


def shared_prefix_length(tokens: torch.Tensor) -> int:
    """Leading positions that every row of (N, L) tokens shares, leaving at least the last used
    position of the shortest row out (so every row keeps its end token)."""
    if tokens.shape[0] == 0:
        return 0
    same = (tokens == tokens[:1]).all(dim=0)
    shared = int(same.long().cumprod(0).sum())
    return max(0, min(shared, int(token_lengths(tokens).min()) - 1))


def _block_step(
    block: nn.Module, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, mask
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One residual block on the next s positions of each row, given the keys / values of the
    positions before them.

    Args:
        block: an open_clip ``ResidualAttentionBlock``. x: (B, s, D). past_k, past_v: (B or 1, H,
            P, D / H). mask: bool (B or 1, 1, s, P + s), True = attends.

    Returns:
        (B, s, D) outputs, and the block's keys and values of these positions (B, H, s, D / H).
    """
    attn = block.attn
    b, s, d = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, s, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    keys = torch.cat([past_k.expand(b, -1, -1, -1), k], dim=2)
    values = torch.cat([past_v.expand(b, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(b, s, d)))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, k, v


def _ends_pooled(clip_model: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether the tower pools the last used position of every row (the end token)."""
    last = tokens.gather(1, token_lengths(tokens)[:, None] - 1)[:, 0]
    if clip_model.text_pool_type == "argmax":
        return bool((last == tokens.max(dim=1).values).all()) and bool(
            ((tokens == last[:, None]).sum(1) == 1).all()
        )
    return bool((last == getattr(clip_model, "text_eos_id", None)).all())


def encode_shared_prefix(
    clip_model: nn.Module, tokens: torch.Tensor, prefix, batch_size: int = 256
) -> torch.Tensor:
    """``encode_tokens`` of prompts that share first tokens with others: each distinct prefix runs
    once (batch 1); the remaining positions of every prompt run with the keys and values of its
    prefix (the tower is causal, so a position depends on the positions before it only), in
    batches of prompts with the same number of remaining positions (no padding). Same embeddings
    within float rounding.

    Args:
        clip_model: an open_clip model the path reproduces (``_prefix_sharable``), pooling the end
            token (the last used position).
        tokens: (N, L) token ids.
        prefix: (N,) or an int: the leading positions of each row run as a shared prefix (rows with
            the same prefix ids share it), fewer than its used length.
        batch_size: prompts a forward.

    Returns:
        (N, D) embeddings, not normalised.
    """
    n = tokens.shape[0]
    lengths = token_lengths(tokens)
    prefix = torch.as_tensor(prefix, dtype=torch.int64).expand(n).to(lengths.device)
    if bool((prefix >= lengths).any()) or not _ends_pooled(clip_model, tokens):
        raise ValueError("every prompt needs its end token after the prefix, pooled")
    cast_dtype = clip_model.transformer.get_cast_dtype()
    pos = clip_model.positional_embedding.to(cast_dtype)
    blocks = clip_model.transformer.resblocks
    d, heads = pos.shape[-1], blocks[0].attn.num_heads
    # the distinct prefixes, run once each: keys / values per block, (n_prefix, H, P, D / H)
    width = int(prefix.max())
    names: Dict[Tuple[int, ...], int] = {}
    which = torch.tensor(
        [names.setdefault(tuple(t[:p].tolist()), len(names)) for t, p in zip(tokens, prefix)]
    )
    past = [pos.new_zeros((2, len(names), heads, width, d // heads)) for _ in blocks]
    for ids, i in names.items():
        if not ids:
            continue
        x = clip_model.token_embedding(torch.tensor([ids], device=tokens.device)).to(cast_dtype)
        x = x + pos[: len(ids)]
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=x.device).tril()
        for block, kv in zip(blocks, past):
            x, k, v = _block_step(block, x, kv[0, :1, :, :0], kv[1, :1, :, :0], causal)
            kv[0, i, :, : len(ids)], kv[1, i, :, : len(ids)] = k[0], v[0]
    out = None
    rest = lengths - prefix
    for size in rest.unique().tolist():
        rows = (rest == size).nonzero()[:, 0]
        for j in range(0, rows.numel(), batch_size):
            r = rows[j : j + batch_size]
            index = prefix[r, None] + torch.arange(size, device=tokens.device)  # (B, s)
            x = clip_model.token_embedding(tokens[r].gather(1, index)).to(cast_dtype) + pos[index]
            # position p_r + i sees its own prefix (p_r of the P columns) and suffix 0 .. i
            cols = torch.arange(width + size, device=x.device)
            own = cols[None, None, :] < prefix[r, None, None]
            causal = (cols[None, :] - width) <= torch.arange(size, device=x.device)[:, None]
            mask = (own | ((cols >= width)[None, None, :] & causal[None]))[:, None]
            for block, kv in zip(blocks, past):
                x = _block_step(block, x, kv[0, which[r]], kv[1, which[r]], mask)[0]
            emb = clip_model.ln_final(x[:, -1])
            projection = clip_model.text_projection
            if projection is not None:
                emb = projection(emb) if isinstance(projection, nn.Linear) else emb @ projection
            if out is None:
                out = emb.new_empty((n, emb.shape[-1]))
            out[r] = emb
    return out


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]):
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class TextClassifier(nn.Module):
    """Class-name embeddings from a CLIP text tower, ensembled over prompt templates and cached.

    The CLIP model is referenced, not registered as a submodule: the classifier's state dict holds
    only its own parameters (the optional void embedding), and the model that owns the CLIP saves it
    once. ``.to()`` / ``.cuda()`` on the classifier also move the referenced model.

    Args:
        clip_model: an open_clip model (``encode_text``).
        templates: a ``TEMPLATE_SETS`` name or a sequence of templates with "{}".
        tokenizer: a ``CLIPTokenizer``; default: the model's BPE tokenizer (``build_tokenizer``).
        void: add a learnable void ("no object") embedding (1, D), init N(0, 1/D), appended to every
            classifier as its last row.
        freeze: set ``requires_grad=False`` on the text tower (default). A text tower that trains
            (CLIP pre-training) must call ``clear_cache()`` after each update.
        batch_size: prompts encoded per forward of the text tower (prompts sorted by length).
        cache_size: vocabularies kept in the cache (least recently used dropped first).
        name_cache_size: single-name embeddings kept (the name cache is emptied when full).
        trim_context: encode at the longest prompt's length (exact, see ``encode_tokens``); False
            = the model's full context (the reference path).
        share_prefix: with ``trim_context``, run the first tokens that the prompts of a template
            share once (``encode_shared_prefix``; where the tower allows it).
        cache_dir: directory of a ``TextEmbeddingCache`` ("" = no disk cache): vocabularies are
            read from / written to disk, keyed by (text-tower weights hash, templates, names).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        templates: Union[str, Sequence[str]] = "vild",
        tokenizer: Optional[CLIPTokenizer] = None,
        void: bool = False,
        freeze: bool = True,
        batch_size: int = 256,
        cache_size: int = 16,
        name_cache_size: int = 100000,
        trim_context: bool = True,
        cache_dir: str = "",
        share_prefix: bool = True,
    ):
        super().__init__()
        object.__setattr__(self, "_clip", clip_model)  # referenced, not a submodule
        self.templates = resolve_templates(templates)
        self.tokenizer = tokenizer or build_tokenizer(clip_model)
        self.batch_size = int(batch_size)
        self.cache_size = int(cache_size)
        self.name_cache_size = int(name_cache_size)
        self.trim_context = bool(trim_context)
        self.share_prefix = bool(share_prefix)
        self._cache: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
        self._name_cache: Dict[str, torch.Tensor] = {}
        self.disk_cache = TextEmbeddingCache(cache_dir) if cache_dir else None
        self._weights_hash: Dict[str, Optional[str]] = {"value": None}
        if freeze:
            for p in text_tower_parameters(clip_model):
                p.requires_grad_(False)
        dim = self._embed_dim()
        self.void_embedding = nn.Parameter(torch.randn(1, dim) * dim**-0.5) if void else None
        clip_model.register_load_state_dict_post_hook(lambda module, keys: self.clear_cache())

    @property
    def clip_model(self) -> nn.Module:
        return self._clip

    def _embed_dim(self) -> int:
        with torch.no_grad(), _eval_mode(text_tower_modules(self._clip)):
            return int(self._clip.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    @property
    def device(self) -> torch.device:
        return next(iter(text_tower_parameters(self._clip))).device

    def clear_cache(self) -> None:
        """Forget every cached vocabulary and name (after the text tower changed)."""
        self._cache.clear()
        self._name_cache.clear()
        self._weights_hash["value"] = None

    def share_cache(self, other: "TextClassifier") -> bool:
        """Use the caches (memory and disk) of ``other`` when both embed names identically (same
        CLIP model, templates, tokenizer kind and context); then a vocabulary is encoded once for
        both. Returns whether the caches are now shared."""
        same = (
            other.clip_model is self._clip
            and other.templates == self.templates
            and type(other.tokenizer.tokenizer) is type(self.tokenizer.tokenizer)
            and other.tokenizer.context_length == self.tokenizer.context_length
        )
        if same:
            self._cache = other._cache
            self._name_cache = other._name_cache
            self._weights_hash = other._weights_hash
            self.disk_cache = other.disk_cache
            self.cache_size = other.cache_size
        return same

    def weights_hash(self) -> str:
        """Hash of the text tower's weights (computed once until ``clear_cache``)."""
        if self._weights_hash["value"] is None:
            self._weights_hash["value"] = text_tower_hash(self._clip)
        return self._weights_hash["value"]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._clip._apply(fn, *args, **kwargs)
        self.clear_cache()
        return self

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed raw texts (no templates), ``batch_size`` at a time, in eval mode, without gradient.

        Returns:
            (T, D) L2-normalised embeddings.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("encode_texts needs at least one text")
        device = self.device
        tokens = self.tokenizer(list(texts))
        # batches of prompts of similar length, each run at its own longest prompt
        order = token_lengths(tokens).argsort(stable=True) if self.trim_context else None
        out = None
        with _eval_mode(text_tower_modules(self._clip)):
            for i in range(0, len(texts), self.batch_size):
                idx = (
                    slice(i, i + self.batch_size)
                    if order is None
                    else order[i : i + self.batch_size]
                )
                emb = encode_tokens(self._clip, tokens[idx].to(device), self.trim_context)
                emb = F.normalize(emb.float(), dim=-1)
                if out is None:
                    out = emb.new_empty((len(texts), emb.shape[1]))
                out[idx] = emb
        return out

    @torch.no_grad()
    def encode_prompts(self, names: Sequence[str]) -> torch.Tensor:
        """Every template of every name, each template's shared first tokens run once when the
        tower allows it (``encode_shared_prefix``), else ``encode_texts``.

        Returns:
            (len(names), T, D) L2-normalised embeddings of the T templates.
        """
        prompts = [t.format(name) for name in names for t in self.templates]
        tokens = self.tokenizer(prompts)
        if not (
            self.trim_context
            and self.share_prefix
            and _prefix_sharable(self._clip)
            and _ends_pooled(self._clip, tokens)
        ):
            return self.encode_texts(prompts).view(len(names), len(self.templates), -1)
        # each template's shared first tokens (the names follow them)
        per_template = tokens.view(len(names), len(self.templates), -1)
        prefix = torch.tensor(
            [shared_prefix_length(per_template[:, j]) for j in range(len(self.templates))]
        ).repeat(len(names))
        with _eval_mode(text_tower_modules(self._clip)):
            out = encode_shared_prefix(
                self._clip, tokens.to(self.device), prefix.to(self.device), self.batch_size
            )
        out = F.normalize(out.float(), dim=-1).view(len(names), len(self.templates), -1)
        return out

    def _check_vocabulary(self, vocabulary: Sequence[str]) -> Tuple[str, ...]:
        if isinstance(vocabulary, str):
            raise TypeError("vocabulary must be a sequence of class names, not a string")
        vocabulary = tuple(vocabulary)
        if not vocabulary:
            raise ValueError("empty vocabulary")
        seen, dups = set(), []
        for name in vocabulary:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"class names must be non-empty strings, got {name!r}")
            if name in seen:
                dups.append(name)
            seen.add(name)
        if dups:
            raise ValueError(f"duplicate class names in the vocabulary: {sorted(set(dups))}")
        return vocabulary

    def class_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """Template-ensembled embeddings of the names (cached; no void row).

        Two caches: whole vocabularies (the tensor returned), and single names, so a new vocabulary
        (e.g. the category names of a training batch) only encodes the names never encoded before.

        Returns:
            (K, D) L2-normalised, without gradient.
        """
        vocabulary = self._check_vocabulary(vocabulary)
        key = (vocabulary, self.templates)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        known = {name: self._name_cache[name] for name in vocabulary if name in self._name_cache}
        missing = [name for name in vocabulary if name not in known]
        from_disk = None
        if missing and self.disk_cache is not None:
            from_disk = self.disk_cache.load(self.weights_hash(), self.templates, vocabulary)
            if from_disk is not None:
                known.update(zip(vocabulary, from_disk.to(self.device)))
                missing = []
        if missing:
            emb = self.encode_prompts(missing)
            known.update(zip(missing, F.normalize(emb.mean(dim=1), dim=-1)))
        new = [name for name in vocabulary if name not in self._name_cache]
        if len(self._name_cache) + len(new) > self.name_cache_size:
            self._name_cache.clear()
            new = vocabulary
        self._name_cache.update((name, known[name]) for name in new)
        emb = torch.stack([known[name] for name in vocabulary])
        if missing and self.disk_cache is not None:
            self.disk_cache.save(self.weights_hash(), self.templates, vocabulary, emb)
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def forward(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """Classifier weights for ``vocabulary``.

        Returns:
            (K, D) L2-normalised class embeddings; (K + 1, D) with the normalised void embedding as
            the last row when the classifier has one (that row carries gradient).

        Raises:
            ValueError: empty vocabulary, duplicate or empty names.
        """
        emb = self.class_embeddings(vocabulary)
        if self.void_embedding is None:
            return emb
        void = F.normalize(self.void_embedding, dim=-1).to(emb.dtype)
        return torch.cat([emb, void], dim=0)

    def extra_repr(self) -> str:
        return f"templates={len(self.templates)}, void={self.void_embedding is not None}"
