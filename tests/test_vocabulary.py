"""The shared vocabulary normalisation (``ov_seg.data.vocabulary``): the demo and any user list."""

import pytest

from ov_seg.data.vocabulary import (
    VocabularyError,
    looks_like_path,
    normalize_vocabulary,
    parse_vocabulary,
)


def test_normalisation_and_near_duplicates():
    assert normalize_vocabulary(["  Traffic\u00a0 Light", "", "sky"]) == ["traffic light", "sky"]
    for names in (["t-shirt", "T shirt"], ["red_star", "red star"], ["Cat", "cat."]):
        with pytest.raises(VocabularyError, match="near-duplicate"):
            normalize_vocabulary(names)
    with pytest.raises(VocabularyError, match="control character"):
        normalize_vocabulary(["sky\x00"])
    with pytest.raises(VocabularyError, match="no class name"):
        normalize_vocabulary([" ", ""])


def test_files_with_bom_and_path_detection(tmp_path):
    f = tmp_path / "names.txt"
    f.write_bytes("\ufeffSky\nred star, grass\n".encode("utf-8"))
    assert parse_vocabulary(str(f)) == ["sky", "red star", "grass"]
    assert looks_like_path("names.txt") and looks_like_path("data/names")
    assert not looks_like_path("person/man,") and not looks_like_path("red star")
    assert parse_vocabulary("person/man,") == ["person/man"]
