"""Noun extraction (spaCy) on hand-written captions: plurals, compounds, stoplist, chunk mode,
caching."""

import pytest

pytest.importorskip("spacy")

from ov_seg.mining.nouns import (  # noqa: E402
    DEFAULT_STOPLIST,
    NounExtractor,
    extract_for_dataset,
    noun_vocabulary,
)


@pytest.fixture(scope="module")
def noun_extractor():
    return NounExtractor(mode="noun")


@pytest.fixture(scope="module")
def chunk_extractor():
    return NounExtractor(mode="chunk")


def test_plurals_are_lemmatised(noun_extractor):
    out = noun_extractor.extract(
        ["Two dogs chase the children across the boxes .", "Three men and their wolves"]
    )
    assert out[0] == ["dog", "child", "box"]
    assert out[1] == ["man", "wolf"]


def test_compounds_kept_or_dropped(noun_extractor):
    text = "A man waits at a traffic light next to a tennis ball ."
    assert noun_extractor.extract([text]) == [["man", "traffic light", "tennis ball"]]
    heads = NounExtractor(mode="noun", compounds=False)
    assert heads.extract([text]) == [["man", "light", "ball"]]


def test_stoplist_drops_non_visual_nouns(noun_extractor):
    text = "A picture of a dog on the left side of the image , in front of a car ."
    out = noun_extractor.extract([text])[0]
    assert out == ["dog", "car"]
    assert {"picture", "side", "image", "front"} <= DEFAULT_STOPLIST
    custom = NounExtractor(mode="noun", stoplist=["dog"])
    assert custom.extract([text])[0] == ["picture", "side", "image", "front", "car"]


def test_pronouns_and_duplicates(noun_extractor):
    assert noun_extractor.extract(["She holds a cup and a cup of coffee ."]) == [["cup", "coffee"]]


def test_chunk_mode_keeps_adjectives(chunk_extractor):
    out = chunk_extractor.extract(
        [
            "a photo of a red circle and a blue square on the grass",
            "A young boy in a red t-shirt stands by a traffic light .",
            "Two little girls .",
            "A black and white dog .",
            "A tri-colored dog and a man 's old hat .",
        ]
    )
    assert out[0] == ["red circle", "blue square", "grass"]
    assert out[1] == ["young boy", "red t-shirt", "traffic light"]
    assert out[2] == ["little girl"]
    assert out[3] == ["black and white dog"]
    assert out[4] == ["tri-colored dog", "man", "old hat"]


def test_tagger_chunker_agrees_on_simple_captions():
    ex = NounExtractor(mode="chunk", chunker="tagger")
    out = ex.extract(
        ["a photo of a red circle and a blue square on the grass", "A black and white dog ."]
    )
    assert out == [["red circle", "blue square", "grass"], ["black and white dog"]]


def test_deterministic_across_batching(noun_extractor):
    texts = [f"A dog number {i} runs after {i % 3 + 1} red balls on the beach ." for i in range(40)]
    a = NounExtractor(batch_size=3, cache_size=0)
    assert a.extract(texts) == noun_extractor.extract(texts) == a.extract(texts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        NounExtractor(mode="verbs")
    with pytest.raises(ValueError, match="chunker"):
        NounExtractor(chunker="regex")
    with pytest.raises(TypeError, match="stoplist"):
        NounExtractor(stoplist="front")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        NounExtractor().extract(["a dog", 3])


def test_vocabulary_counts_captions():
    assert noun_vocabulary([["dog", "ball"], ["dog", "dog"], ["cat"]]) == {
        "dog": 2,
        "ball": 1,
        "cat": 1,
    }


def test_extract_for_dataset_is_cached(toyworld_root, chunk_extractor, tmp_path):
    from ov_seg.mining import nouns as nouns_module

    per_image = extract_for_dataset(
        "toyworld_captions_val", chunk_extractor, cache_dir=str(tmp_path)
    )
    files = list(tmp_path.glob("toyworld_captions_val-*.json"))
    assert len(files) == 1
    assert len(per_image) == 24 and all(isinstance(v, list) for v in per_image.values())
    # the toy world's thing categories are colour + shape: chunk mode keeps both
    names = {p for v in per_image.values() for p in v}
    assert any(" " in p for p in names)
    nouns_module._DATASET_MEMO.clear()
    calls = []
    original = chunk_extractor._extract_unique
    chunk_extractor._extract_unique = lambda texts: calls.append(texts) or original(texts)
    try:
        again = extract_for_dataset(
            "toyworld_captions_val", chunk_extractor, cache_dir=str(tmp_path)
        )
        per_caption = extract_for_dataset(
            "toyworld_captions_val", chunk_extractor, per_caption=True, cache_dir=str(tmp_path)
        )
    finally:
        chunk_extractor._extract_unique = original
    assert again == per_image and not calls  # read from the disk cache, nothing parsed
    first = next(iter(per_caption))
    assert list(dict.fromkeys(p for c in per_caption[first] for p in c)) == per_image[first]


def test_worker_processes_match_one_process_and_are_reused():
    """``n_process=2`` gives the single-process output; the worker pool survives between calls
    (a job calls ``extract`` per chunk) and ``close`` stops it."""
    texts = [
        f"{n} red dogs chase a {w} ball near the tennis courts ."
        for n in ("Two", "Three", "Four")
        for w in ("blue", "small", "big", "tennis")
    ] * 3
    one = NounExtractor(chunker="tagger", batch_size=4, cache_size=0).extract(texts)
    with NounExtractor(chunker="tagger", batch_size=4, n_process=2, cache_size=0) as ex:
        assert ex.extract(texts) == one
        pool = ex._pool
        assert pool is not None
        workers = [w.pid for w in pool._pool]
        assert ex.extract(texts[::-1]) == one[::-1]
        assert ex._pool is pool and [w.pid for w in pool._pool] == workers
    assert ex._pool is None
    assert one[0] == ["dog", "ball", "tennis court"]


def test_large_dataset_parse_uses_free_cores(toyworld_root, tmp_path, monkeypatch):
    """A one-time dataset parse above PARALLEL_MIN_TEXTS runs in temporary worker processes (2
    cores here) and gives the single-process result; the extractor keeps no pool."""
    from ov_seg.mining import nouns as nouns_module
    from ov_seg.utils.threads import free_cores

    if free_cores() < 2:
        pytest.skip("one free core: no worker pool")
    extractor = NounExtractor(mode="chunk", chunker="tagger")
    single = extract_for_dataset("toyworld_captions_val", extractor, cache_dir=str(tmp_path / "a"))
    nouns_module._DATASET_MEMO.clear()
    used = []
    original = nouns_module.NounExtractor.from_settings
    monkeypatch.setattr(nouns_module, "PARALLEL_MIN_TEXTS", 1)
    monkeypatch.setattr(
        nouns_module.NounExtractor,
        "from_settings",
        classmethod(lambda cls, s, **kw: used.append(kw) or original(s, **kw)),
    )
    fresh = NounExtractor(mode="chunk", chunker="tagger")
    parallel = extract_for_dataset("toyworld_captions_val", fresh, cache_dir=str(tmp_path / "b"))
    assert parallel == single
    assert used and used[0]["n_process"] >= 2
    assert fresh._pool is None
