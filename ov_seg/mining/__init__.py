"""Caption mining: nouns from captions (spaCy) and noun-to-proposal assignment (pure, testable
parts).

``nouns``: ``NounExtractor`` (head nouns or noun chunks with adjectives), ``extract_for_dataset``
(cached);
``captions``: caption file readers; ``assign``: noun-to-proposal assignment on score tensors;
``job``: chunked, resumable, shardable job files; ``nouns_job`` / ``pairs_job``: the two stages of
``tools/mine_captions.py``.
"""

from .assign import Assignment, assign_nouns, cosine_scores
from .captions import CaptionImage, CaptionSet, MalformedCaptionError, load_captions
from .nouns import (
    DEFAULT_STOPLIST,
    PLURALIA_TANTUM,
    CaptionNounTable,
    NounExtractor,
    NounExtractorSettings,
    WordNetFilter,
    extract_for_dataset,
    noun_vocabulary,
)

__all__ = [
    "Assignment",
    "assign_nouns",
    "cosine_scores",
    "CaptionImage",
    "CaptionSet",
    "MalformedCaptionError",
    "load_captions",
    "DEFAULT_STOPLIST",
    "PLURALIA_TANTUM",
    "NounExtractor",
    "NounExtractorSettings",
    "WordNetFilter",
    "CaptionNounTable",
    "extract_for_dataset",
    "noun_vocabulary",
]
