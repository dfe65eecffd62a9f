"""On-disk cache of prompt-ensembled class-name embeddings.

One file per (text-tower weights, template set, vocabulary): ``<root>/<weights hash>/<key>.pt``
holding ``{"names", "templates", "embeddings" (K, D)}``; ``key`` hashes the templates and the names
(in order), and a hit is checked against the stored names and templates. Files are written
atomically (temporary file in the same directory, then ``os.replace``), so concurrent processes
and interrupted writes never leave a partial file behind.

The weights hash covers every tensor of the text tower (token embedding, positional embedding,
transformer, final norm, projection, attention mask) with its name, dtype and shape: a fine-tuned or
differently initialised text tower never reads another's embeddings.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .text_tower import text_tower_modules

__all__ = ["TextEmbeddingCache", "text_tower_hash", "text_tower_tensors"]

logger = logging.getLogger(__name__)

# bump when the stored content or the embedding computation changes
CACHE_VERSION = 1


def text_tower_tensors(clip_model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of everything the text embedding of an open_clip model depends on."""
    for i, module in enumerate(text_tower_modules(clip_model)):
        for key, value in module.state_dict(keep_vars=False).items():
            yield f"m{i}.{key}", value
    for name in ("positional_embedding", "text_projection", "attn_mask"):
        value = getattr(clip_model, name, None)
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, nn.Module):
            for key, v in value.state_dict().items():
                yield f"{name}.{key}", v


def text_tower_hash(clip_model: nn.Module) -> str:
    """Hex digest (32 characters, BLAKE2b) of the text tower's tensors (names, dtypes, shapes and
    bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION};{type(clip_model).__name__};".encode())
    for name, value in text_tower_tensors(clip_model):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class TextEmbeddingCache:
    """Class-name embeddings on disk, keyed by (weights hash, templates, names).

    Args:
        root: cache directory (created on the first write).
    """

    def __init__(self, root: str):
        if not root:
            raise ValueError("TextEmbeddingCache needs a directory")
        self.root = Path(os.path.expanduser(root))

    def path(self, weights_hash: str, templates: Sequence[str], names: Sequence[str]) -> Path:
        """The file of one (weights, templates, vocabulary)."""
        key = hashlib.blake2b(
            json.dumps([list(templates), list(names)], ensure_ascii=True).encode(), digest_size=16
        ).hexdigest()
        return self.root / weights_hash / f"{key}.pt"

    def load(
        self, weights_hash: str, templates: Sequence[str], names: Sequence[str]
    ) -> Optional[torch.Tensor]:
        """(K, D) embeddings, or None (no file, unreadable file, or a key collision)."""
        path = self.path(weights_hash, templates, names)
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file is a miss, and is overwritten by the next save
            logger.warning("unreadable text embedding cache file %s: %s", path, e)
            return None
        if (
            not isinstance(obj, dict)
            or obj.get("names") != list(names)
            or obj.get("templates") != list(templates)
            or not isinstance(obj.get("embeddings"), torch.Tensor)
            or obj["embeddings"].shape[0] != len(names)
        ):
            return None
        return obj["embeddings"]

    def save(
        self,
        weights_hash: str,
        templates: Sequence[str],
        names: Sequence[str],
        embeddings: torch.Tensor,
    ) -> Path:
        """Write (K, D) embeddings atomically. Returns the path."""
        path = self.path(weights_hash, templates, names)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        obj = {
            "names": list(names),
            "templates": list(templates),
            "embeddings": embeddings.detach().to("cpu").contiguous(),
        }
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return path
