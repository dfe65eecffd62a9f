"""Caption readers: CSV / TSV / COCO JSON / JSON lines / datasets; malformed lines reported as
file:line."""

import json

import pytest

from ov_seg.mining.captions import MalformedCaptionError, load_captions


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_groups_by_image_and_reports_bad_lines(tmp_path):
    path = _write(
        tmp_path / "captions.csv",
        "image,caption\n"
        "a.jpg,A dog runs .\n"
        'b.jpg,"A man, in a red shirt , waves ."\n'
        "a.jpg,Two   dogs play .\n"
        "c.jpg\n"
        "d.jpg,\n"
        ",a caption without image\n"
        'e.jpg,"unterminated\n',
    )
    cs = load_captions(str(path), image_root="/imgs")
    assert [im.image_id for im in cs.images] == ["a.jpg", "b.jpg"]
    assert cs.images[0].captions == ["A dog runs .", "Two dogs play ."]
    assert cs.images[0].file_name == "/imgs/a.jpg"
    assert cs.images[1].captions == ["A man, in a red shirt , waves ."]
    assert [p.split(": ")[0] for p in cs.problems] == [f"{path}:{n}" for n in (5, 6, 7, 8)]
    assert "expected 2 fields" in cs.problems[0] and "empty caption" in cs.problems[1]
    with pytest.raises(MalformedCaptionError, match=f"{path}:5: expected 2 fields"):
        load_captions(str(path), strict=True)


def test_tsv_openclip_header_and_headerless(tmp_path):
    path = _write(
        tmp_path / "train.tsv", "filepath\ttitle\nx/1.png\ta red star\nx/2.png\ta blue ring\n"
    )
    cs = load_captions(str(path))
    assert [im.captions for im in cs.images] == [["a red star"], ["a blue ring"]]
    assert cs.images[0].file_name == str(tmp_path / "x/1.png")
    raw = _write(tmp_path / "cc3m.tsv", "a dog on a beach\thttp://x/1.jpg\n")
    with pytest.raises(MalformedCaptionError, match="no header"):
        load_captions(str(raw))
    cs = load_captions(str(raw), image_column=1, caption_column=0)
    assert cs.images[0].image_id == "http://x/1.jpg" and cs.images[0].captions == [
        "a dog on a beach"
    ]


def test_coco_captions_json(tmp_path):
    coco = {
        "images": [
            {"id": 7, "file_name": "7.jpg", "height": 4, "width": 5},
            {"id": 8, "file_name": "8.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 8, "caption": "a cat"},
            {"id": 2, "image_id": 7, "caption": "a dog"},
            {"id": 3, "image_id": 9, "caption": "an orphan"},
            {"id": 4, "image_id": 7},
            {"id": 5, "image_id": 8, "caption": "a cat on a mat"},
        ],
    }
    path = _write(tmp_path / "captions_train2017.json", json.dumps(coco))
    cs = load_captions(str(path), image_root="root")
    assert [(im.image_id, im.captions) for im in cs.images] == [
        (8, ["a cat", "a cat on a mat"]),
        (7, ["a dog"]),
    ]
    assert cs.images[1].height == 4 and cs.images[1].to_dict()["width"] == 5
    assert [p.split(": ")[0] for p in cs.problems] == [
        f"{path}:annotations[2]",
        f"{path}:annotations[3]",
    ]
    bad = _write(tmp_path / "bad.json", '{"images": [\n  1,\n')
    with pytest.raises(MalformedCaptionError, match=rf"{bad}:3: invalid JSON"):
        load_captions(str(bad))


def test_jsonl(tmp_path):
    path = _write(
        tmp_path / "c.jsonl",
        '{"image": "1.png", "caption": "a dog"}\nnot json\n'
        '{"image": "2.png", "captions": ["x", "y"]}\n[1]\n',
    )
    cs = load_captions(str(path))
    assert [im.captions for im in cs.images] == [["a dog"], ["x", "y"]]
    assert [p.split(": ")[0] for p in cs.problems] == [f"{path}:2", f"{path}:4"]


def test_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_captions(str(tmp_path / "missing.csv"))
    with pytest.raises(KeyError, match="format"):
        load_captions(str(_write(tmp_path / "x.txt", "a")))


def test_registered_dataset(toyworld_root):
    cs = load_captions("toyworld_captions_val")
    assert len(cs.images) == 24 and not cs.problems
    assert all(im.captions and im.height == 64 for im in cs.images)


def test_flickr8k_subset(shared_dir):
    cs = load_captions(str(shared_dir / "data" / "flickr8k_subset1000" / "captions.csv"))
    assert len(cs.images) == 1000 and cs.num_captions == 5000 and not cs.problems
    assert cs.images[0].file_name.endswith("images/1000268201_693b08cb0e.jpg")


# ---- bad input (issue 23, cases 11-13) -----------------------------------------------------------
def test_unhashable_image_keys_are_malformed_lines_not_a_crash(tmp_path):
    """Case 11: {"image": [...]} raised TypeError: unhashable type."""
    path = _write(
        tmp_path / "c.jsonl",
        '{"image": ["1.png"], "caption": "a dog"}\n'
        '{"image": {"id": 2}, "caption": "a cat"}\n'
        '{"image": "3.png", "caption": "a cow"}\n',
    )
    cs = load_captions(str(path))
    assert [im.image_id for im in cs.images] == ["3.png"]
    assert cs.problems == [
        f"{path}:1: image key must be a string or an integer, got list",
        f"{path}:2: image key must be a string or an integer, got dict",
    ]
    coco = {"images": [{"id": [7], "file_name": "7.jpg"}], "annotations": []}
    cs = load_captions(str(_write(tmp_path / "coco.json", json.dumps(coco))))
    assert cs.problems[0].endswith("images[0]: image key must be a string or an integer, got list")


def test_latin1_csv_is_a_clear_error_or_read_with_the_encoding(tmp_path):
    """Case 11: a latin-1 CSV crashed with UnicodeDecodeError (no file, no line)."""
    path = tmp_path / "latin1.csv"
    path.write_bytes("image,caption\na.jpg,A dog in a café .\nb.jpg,A cat .\n".encode("latin-1"))
    with pytest.raises(MalformedCaptionError, match=rf"{path}:2: not valid utf-8-sig.*latin-1"):
        load_captions(str(path))
    cs = load_captions(str(path), encoding="latin-1")
    assert cs.images[0].captions == ["A dog in a café ."]


def test_utf8_bom_before_the_header_is_read(tmp_path):
    """Case 12: '\\ufeffimage' was not recognised as the image column."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffimage,caption\na.jpg,A dog .\n".encode("utf-8"))
    cs = load_captions(str(path))
    assert [im.image_id for im in cs.images] == ["a.jpg"] and not cs.problems


def test_non_english_captions_are_skipped_with_a_reason(tmp_path):
    """Case 13: non-English captions yielded garbage nouns without a warning."""
    path = _write(
        tmp_path / "mixed.csv",
        "image,caption\n"
        "a.jpg,A dog runs on the beach .\n"
        "a.jpg,Un perro corre en la playa .\n"
        "b.jpg,Zwei Kinder spielen im Park .\n"
        "c.jpg,一只狗在草地上奔跑\n"
        "d.jpg,A man at La Jolla beach .\n",
    )
    cs = load_captions(str(path), strict=True)  # strict is about malformed lines only
    assert [(im.image_id, im.captions) for im in cs.images] == [
        ("a.jpg", ["A dog runs on the beach ."]),
        ("d.jpg", ["A man at La Jolla beach ."]),
    ]
    assert cs.skipped == {"language": 3}
    assert [p.split(": ")[0] for p in cs.problems] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert "not English" in cs.problems[0]
    assert load_captions(str(path), english_only=False).num_captions == 5
