"""Tokenisation for open_clip text towers, and a compact-vocabulary token embedding for training.

``CLIPTokenizer`` wraps open_clip's BPE ``SimpleTokenizer`` with a per-word cache: for plain ASCII
text (no HTML entities) it gives exactly the ids of ``SimpleTokenizer.__call__`` at a fraction of
the cost (ftfy cleaning is skipped, and BPE runs once per distinct word), which matters when a
training step tokenises hundreds of captions on the data-loading thread.

``CompactTokenEmbedding`` replaces ``model.token_embedding`` while training a text tower: only the
rows of the token ids that occur in the training texts are parameters (a 64-wide tiny model
otherwise spends most of its parameters, and 10-15% of an AdamW step, on the 49k-row table). Its
state dict is the full ``(vocab_size, width)`` table, so checkpoints stay plain open_clip state
dicts.
"""

import functools
import re
from typing import Dict, Iterable, List, Optional, Sequence

import open_clip
import torch
from torch import nn

__all__ = [
    "CLIPTokenizer",
    "build_tokenizer",
    "CompactTokenEmbedding",
    "install_compact_vocabulary",
]

# Characters that SimpleTokenizer's cleaning (ftfy + html.unescape) could change.
_NEEDS_CLEANING = re.compile(r"[^\x20-\x7e]|&")


@functools.lru_cache(maxsize=None)
def _simple_tokenizer(context_length: int):
    """open_clip's BPE tokenizer, built once per process (reading its merges takes 0.25 s)."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class CLIPTokenizer:
    """Callable ``texts -> LongTensor (N, context_length)`` for an open_clip model.

    Args:
        context_length: L, the text tower's context length (``clip_sizes(model).context_length``).
        tokenizer: an open_clip tokenizer to wrap; default: the BPE ``SimpleTokenizer`` (every model
            with a CLIP-style text tower). Non-BPE tokenizers (HF) are called as they are, without
            the word cache.
    """

    def __init__(self, context_length: int, tokenizer=None):
        self.context_length = int(context_length)
        self.tokenizer = tokenizer or _simple_tokenizer(self.context_length)
        simple = isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
        self._fast = simple and not getattr(self.tokenizer, "reduction_fn", None)
        if self._fast:
            self._sot = self.tokenizer.sot_token_id
            self._eot = self.tokenizer.eot_token_id
        self._word_ids: Dict[str, List[int]] = {}

    def _encode_words(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in text.split():
            cached = self._word_ids.get(word)
            if cached is None:
                cached = self.tokenizer.encode(word)
                self._word_ids[word] = cached
            ids.extend(cached)
        return ids

    def encode(self, text: str) -> List[int]:
        """BPE ids of ``text`` without start / end tokens (no truncation)."""
        if self._fast and not _NEEDS_CLEANING.search(text):
            return self._encode_words(text)
        return self.tokenizer.encode(text)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise ``texts`` (a string or a sequence of strings).

        Returns:
            (N, L) int64 ids: start token, BPE ids, end token, zero padding; texts longer than L are
            truncated with the end token kept last (open_clip's convention).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not self._fast:
            return self.tokenizer(list(texts), context_length=self.context_length)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self._sot, *self.encode(text), self._eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self._eot
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def vocabulary(self, texts: Iterable[str]) -> List[int]:
        """Sorted distinct token ids (start and end tokens included) used by ``texts``."""
        ids, words = set(), set()
        for text in texts:
            if self._fast and not _NEEDS_CLEANING.search(text):
                words.update(text.split())  # word by word, as ``encode`` does: each word once
            else:
                ids.update(self.encode(text))
        for word in words:
            ids.update(self._encode_words(word))
        if self._fast:
            ids.update((self._sot, self._eot))
        return sorted(ids)


def _plain_bpe(model_name: str) -> bool:
    """True when open_clip would give ``model_name`` the default BPE tokenizer (a built-in config
    without an HF tokenizer or tokenizer options; not SigLIP): then it is not built just to be
    dropped."""
    if ":" in model_name or "siglip" in model_name.lower():
        return False
    cfg = open_clip.get_model_config(model_name)
    text_cfg = (cfg or {}).get("text_cfg", {})
    return cfg is not None and not {"hf_tokenizer_name", "tokenizer_kwargs"} & set(text_cfg)


def build_tokenizer(model: nn.Module, model_name: str = "") -> CLIPTokenizer:
    """The tokenizer of an open_clip model, context length read from the model.

    Args:
        model: the open_clip model.
        model_name: its open_clip name; used only for non-BPE tokenizers (HF text towers), whose
            kind open_clip derives from the name.
    """
    context_length = int(model.context_length)
    inner = None
    if model_name and not _plain_bpe(model_name):
        inner = open_clip.get_tokenizer(model_name, context_length=context_length)
        if isinstance(inner, open_clip.tokenizer.SimpleTokenizer):
            inner = None  # ours, with the same context length
    return CLIPTokenizer(context_length, inner)


class CompactTokenEmbedding(nn.Module):
    """A token embedding whose trainable rows are the ids in ``token_ids``; the other rows stay
    frozen.

    Behaves as the full ``nn.Embedding`` it replaces (ids outside ``token_ids`` read the frozen
    table), and its state dict holds the full table under ``weight``, so saving / loading works with
    plain open_clip state dicts.

    Args:
        embedding: the full ``nn.Embedding`` (V, W) it replaces (its values initialise both parts).
        token_ids: the ids whose rows train.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        full = embedding.weight.detach()
        ids = torch.as_tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("CompactTokenEmbedding needs at least one token id")
        if ids.min() < 0 or ids.max() >= full.shape[0]:
            raise ValueError(
                f"token ids must lie in [0, {full.shape[0]}), got {ids.min()}..{ids.max()}"
            )
        lookup = torch.full((full.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.num_embeddings, self.embedding_dim = full.shape
        self.register_buffer("frozen_weight", full.clone(), persistent=False)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.compact_weight = nn.Parameter(full[ids].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The full (V, W) table (trained rows scattered into the frozen ones), without gradient."""
        full = self.frozen_weight.clone()
        full[self.token_ids] = self.compact_weight.detach()
        return full

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) int64 ids -> (…, W) embeddings; gradients reach only the compact rows."""
        idx = self.lookup[ids]
        trained = self.compact_weight[idx.clamp(min=0)]
        return torch.where((idx >= 0).unsqueeze(-1), trained, self.frozen_weight[ids])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        full = state_dict[key]
        if tuple(full.shape) != tuple(self.frozen_weight.shape):
            error_msgs.append(
                f"size mismatch for {key}: checkpoint {tuple(full.shape)}, "
                f"model {tuple(self.frozen_weight.shape)}"
            )
            return
        with torch.no_grad():
            self.frozen_weight.copy_(full)
            self.compact_weight.copy_(full[self.token_ids.to(full.device)])

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, trainable rows={self.token_ids.numel()}"
        )


def install_compact_vocabulary(
    model: nn.Module,
    tokenizer: CLIPTokenizer,
    texts: Iterable[str],
    extra_ids: Optional[Iterable[int]] = None,
) -> CompactTokenEmbedding:
    """Replace ``model.token_embedding`` by a ``CompactTokenEmbedding`` over the ids of ``texts``.

    Returns:
        the installed module.

    Raises:
        TypeError: when the model has no ``token_embedding`` (``nn.Embedding``), e.g. an HF text
            tower.
    """
    emb = getattr(model, "token_embedding", None)
    if isinstance(emb, CompactTokenEmbedding):
        emb = nn.Embedding.from_pretrained(emb.weight, freeze=False)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(
            "a compact vocabulary needs an open_clip CLIP with an nn.Embedding token_embedding"
        )
    ids = set(tokenizer.vocabulary(texts))
    ids.update(int(i) for i in (extra_ids or ()))
    compact = CompactTokenEmbedding(emb, sorted(ids))
    model.token_embedding = compact
    return compact
