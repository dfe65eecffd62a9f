"""Open-vocabulary text classifier: prompt-ensembled CLIP text embeddings of class names, cached.

Each name goes through every template of a template set; the normalised embeddings are averaged and
re-normalised. The classifier of a vocabulary is computed once per (vocabulary, template set) and
cached; the text tower is frozen and run in eval mode. ``encode_texts`` embeds raw texts (captions,
nouns) in batches.
"""

from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from .tokenizer import CLIPTokenizer, build_tokenizer

__all__ = [
    "TextClassifier",
    "TEMPLATE_SETS",
    "resolve_templates",
    "text_tower_modules",
    "text_tower_parameters",
]

# The 14 ViLD templates (OVSeg's default prompt set; its released code uses 9 of them).
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


def text_tower_modules(clip_model: nn.Module) -> List[nn.Module]:
    """The modules of an open_clip model's text tower (``CLIP`` or ``CustomTextCLIP``)."""
    text = getattr(clip_model, "text", None)
    if isinstance(text, nn.Module):
        return [text]
    return [clip_model.token_embedding, clip_model.transformer, clip_model.ln_final]


def text_tower_parameters(clip_model: nn.Module) -> List[nn.Parameter]:
    """Parameters of an open_clip model's text tower (modules, positional embedding, projection)."""
    params = [p for m in text_tower_modules(clip_model) for p in m.parameters()]
    for name in ("positional_embedding", "text_projection"):
        value = getattr(clip_model, name, None)
        if isinstance(value, nn.Parameter):
            params.append(value)
        elif isinstance(value, nn.Module):
            params.extend(value.parameters())
    return params


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
        batch_size: prompts encoded per forward of the text tower.
        cache_size: vocabularies kept in the cache (least recently used dropped first).
        name_cache_size: single-name embeddings kept (the name cache is emptied when full).
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
    ):
        super().__init__()
        object.__setattr__(self, "_clip", clip_model)  # referenced, not a submodule
        self.templates = resolve_templates(templates)
        self.tokenizer = tokenizer or build_tokenizer(clip_model)
        self.batch_size = int(batch_size)
        self.cache_size = int(cache_size)
        self.name_cache_size = int(name_cache_size)
        self._cache: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
        self._name_cache: Dict[str, torch.Tensor] = {}
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
        out = []
        with _eval_mode(text_tower_modules(self._clip)):
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(device)
                out.append(F.normalize(self._clip.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

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
        missing = [name for name in vocabulary if name not in self._name_cache]
        if missing:
            prompts = [t.format(name) for name in missing for t in self.templates]
            emb = self.encode_texts(prompts).view(len(missing), len(self.templates), -1)
            emb = F.normalize(emb.mean(dim=1), dim=-1)
            if len(self._name_cache) + len(missing) > self.name_cache_size:
                self._name_cache.clear()
            self._name_cache.update(zip(missing, emb))
        emb = torch.stack([self._name_cache[name] for name in vocabulary])
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
