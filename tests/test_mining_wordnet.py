"""The optional WordNet filter of noun extraction (NLTK WordNet from ../shared/nltk_data).

Loading WordNet takes seconds (tens of seconds on a busy machine): these tests live apart from the
spaCy ones.
"""

import pytest

from ov_seg.mining.nouns import WordNetFilter

nltk = pytest.importorskip("nltk")


def test_wordnet_missing_is_a_clear_error(tmp_path, monkeypatch):
    from nltk.corpus import wordnet

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    if wordnet.__class__.__name__ != "LazyCorpusLoader":
        pytest.skip("WordNet already loaded in this process")
    with pytest.raises(RuntimeError, match="NLTK_DATA"):
        WordNetFilter()


def test_wordnet_filter(shared_dir, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(shared_dir / "nltk_data")])
    f = WordNetFilter()
    assert f("dog", "dog") and f(
        "traffic light", "light"
    )  # WordNet files traffic_light under signals
    assert not f("happiness", "happiness")
    assert not f("qwertzuiop", "qwertzuiop")
