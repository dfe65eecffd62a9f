"""The nouns of each caption that a caption-supervised method asks for, computed on the data side.

The caption mapper (``INPUT.DATASET_MAPPER_NAME caption``) is the one path by which noun phrases
reach the models: it adds a ``nouns`` field (one phrase list per caption, aligned with
``captions``) to every training dict, computed with the extractor the method's config asks for.
The models only read that field; none owns an extractor or a noun table.

Which extractor a method asks for is read from its own config keys by a function registered under
its ``MODEL.META_ARCHITECTURE`` name in ``CAPTION_NOUN_SETTINGS``; a method with no entry (or one
whose entry returns None, e.g. PACL with prompt augmentation off) gets no ``nouns`` field.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from ov_seg.utils.registry import NamedRegistry

__all__ = [
    "CAPTION_NOUN_SETTINGS",
    "CaptionNounSettings",
    "build_caption_noun_table",
    "caption_noun_settings",
]


@dataclass(frozen=True)
class CaptionNounSettings:
    """What a method asks of the noun extractor (``ov_seg.mining.NounExtractor``).

    Attributes:
        mode: "noun" (head nouns with compounds) or "chunk" (noun chunks with adjectives).
        chunker: "parser" (spaCy dependency noun chunks) or "tagger" (POS tag runs).
        datasets: caption datasets whose captions are parsed once, up front, through the disk-cached
            ``ov_seg.mining.extract_for_dataset`` (empty: each caption is parsed when first met).
    """

    mode: str
    chunker: str
    datasets: Tuple[str, ...] = ()


CAPTION_NOUN_SETTINGS = NamedRegistry("CAPTION_NOUN_SETTINGS")
CAPTION_NOUN_SETTINGS.__doc__ = """
Registry of ``fn(cfg) -> Optional[CaptionNounSettings]``, one per caption-supervised
``MODEL.META_ARCHITECTURE`` that reads caption nouns: the extractor settings the method's config
asks for, or None when that config uses no nouns.
"""


@CAPTION_NOUN_SETTINGS.register("PACL")
def pacl_noun_settings(cfg) -> Optional[CaptionNounSettings]:
    """PACL's prompt augmentation (``MODEL.PACL.PROMPT_AUG``): None when it is off."""
    aug = cfg.MODEL.PACL.PROMPT_AUG
    if not (aug.ENABLED and aug.WEIGHT > 0):
        return None
    datasets = tuple(cfg.DATASETS.TRAIN) if aug.DATASET_CACHE else ()
    return CaptionNounSettings(aug.NOUN_MODE, aug.CHUNKER, datasets)


@CAPTION_NOUN_SETTINGS.register("MGCA")
def mgca_noun_settings(cfg) -> CaptionNounSettings:
    """MGCA's entities (``MODEL.MGCA.ENTITY_MODE`` / ``ENTITY_CHUNKER``), parsed per caption when
    met (MGCA has no dataset-cache key). ``MAX_ENTITIES`` stays with the model: its random subset
    of the phrases is drawn per training step."""
    mc = cfg.MODEL.MGCA
    return CaptionNounSettings(mc.ENTITY_MODE, mc.ENTITY_CHUNKER)


@CAPTION_NOUN_SETTINGS.register("MixReorg")
def mixreorg_noun_settings(cfg) -> Optional[CaptionNounSettings]:
    """MixReorg's noun prompts (``MODEL.MIXREORG.NOUN_PROMPTS``): None when their weight is 0."""
    np_cfg = cfg.MODEL.MIXREORG.NOUN_PROMPTS
    if np_cfg.WEIGHT <= 0:
        return None
    datasets = tuple(cfg.DATASETS.TRAIN) if np_cfg.DATASET_CACHE else ()
    return CaptionNounSettings(np_cfg.NOUN_MODE, np_cfg.CHUNKER, datasets)


def caption_noun_settings(cfg) -> Optional[CaptionNounSettings]:
    """The noun settings of ``cfg``'s method (None: its training inputs carry no ``nouns``)."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in CAPTION_NOUN_SETTINGS:
        return None
    return CAPTION_NOUN_SETTINGS.get(name)(cfg)


def build_caption_noun_table(cfg):
    """The ``ov_seg.mining.CaptionNounTable`` (captions -> one phrase list each) of ``cfg``'s
    method, or None when the method reads no nouns. spaCy and the datasets are loaded at the
    table's first call (or its ``load``)."""
    settings = caption_noun_settings(cfg)
    if settings is None:
        return None
    from ov_seg.mining.nouns import CaptionNounTable, NounExtractor  # spaCy lazily there

    extractor = NounExtractor(mode=settings.mode, chunker=settings.chunker)
    label = f"{cfg.MODEL.META_ARCHITECTURE} caption nouns"
    return CaptionNounTable(extractor, settings.datasets, label)
