"""Plural-only nouns (pluralia tantum) are kept whole by the noun extractor: hand-written and real
Flickr8k captions."""

import csv
import re

import pytest

pytest.importorskip("spacy")

from ov_seg.mining.nouns import PLURALIA_TANTUM, NounExtractor  # noqa: E402

# plural-only word -> what singularising it wrongly gives
WRONG_SINGULAR = {
    "shorts": "short",
    "sunglasses": "sunglass",
    "jeans": "jean",
    "pants": "pant",
    "clothes": "clothe",
    "glasses": "glass",
}


@pytest.fixture(scope="module")
def extractor():
    return NounExtractor(mode="noun")


def test_plural_only_nouns_kept_whole(extractor):
    texts = [
        "A man in blue shorts and sunglasses holds a pair of scissors .",
        "Two dogs run past boys in jeans and pants on the stairs .",
    ]
    assert extractor.extract(texts) == [
        ["man", "shorts", "sunglasses", "scissors"],
        ["dog", "boy", "jeans", "pants", "stairs"],
    ]
    chunks = NounExtractor(mode="chunk").extract(["a woman in khaki shorts and dark glasses"])
    assert chunks == [["woman", "khaki shorts", "dark glasses"]]
    # the lexicon is a setting: empty, every plural is singularised (the old behaviour)
    singular = NounExtractor(mode="noun", plural_only=())
    assert singular.extract(texts[:1]) == [["man", "short", "sunglass", "scissor"]]
    assert singular.cache_key() != extractor.cache_key()  # caches of the two never mix
    assert {"shorts", "jeans", "pants", "clothes", "trousers", "scissors"} <= PLURALIA_TANTUM


def _flickr_captions(shared_dir):
    path = shared_dir / "data" / "flickr8k_subset1000" / "captions.csv"
    if not path.is_file():
        pytest.skip("../shared/data/flickr8k_subset1000 is absent")
    with open(path, newline="") as f:
        return [row["caption"] for row in csv.DictReader(f)]


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_real_captions_keep_plural_only_nouns(extractor, shared_dir):
    captions = [c for c in _flickr_captions(shared_dir) if _words(c) & set(WRONG_SINGULAR)]
    assert len(captions) >= 100  # 5000 captions: shorts 78, sunglasses 35, pants 34, ...
    for name, ex in (("lexicon", extractor), ("none", NounExtractor(mode="noun", plural_only=()))):
        wrong = kept = 0
        for caption, nouns in zip(captions, ex.extract(captions)):
            heads = {n.split()[-1] for n in nouns}
            for word in _words(caption) & set(WRONG_SINGULAR):
                kept += word in heads
                wrong += WRONG_SINGULAR[word] in heads
        if name == "lexicon":
            # every plural-only word the tagger calls a noun stays whole; a few are mis-tagged
            # ("sunglasses smiles") or attached to another noun by the parser
            assert wrong == 0 and kept >= 0.9 * len(captions), (wrong, kept, len(captions))
        else:  # without the lexicon the same captions are singularised into other words
            assert wrong >= 0.9 * len(captions) and kept == 0, (wrong, kept, len(captions))
