"""tools/demo.py on generated toy-world images with a tiny random model: the expected files, the
single-class rule, clear errors."""

import importlib.util
import shutil

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

CONFIG = str(REPO / "configs/toyworld/two_stage_R18.yaml")
OPTS = ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]


def _demo():
    spec = importlib.util.spec_from_file_location("ov_seg_demo", REPO / "tools" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def images(toyworld_root, tmp_path_factory):
    src = sorted((toyworld_root / "val" / "images").iterdir())[:2]
    folder = tmp_path_factory.mktemp("demo_in")
    for p in src:
        shutil.copy(p, folder / p.name)
    return folder, [p.stem for p in src]


def test_demo_writes_pictures_and_labels(images, tmp_path):
    folder, stems = images
    demo = _demo()
    vocabulary = tmp_path / "names.txt"
    vocabulary.write_text("red star\nblue circle, grass\nsky\n")
    out = tmp_path / "out"
    demo.main(
        [
            "--config-file",
            CONFIG,
            "--input",
            str(folder / "*.png"),
            "--vocabulary",
            str(vocabulary),
            "--output",
            str(out),
            "--labels",
            "--scale",
            "2",
            *OPTS,
        ]
    )
    for stem in stems:
        size = Image.open(folder / f"{stem}.png").size
        for kind in ("sem", "pan"):
            pic = Image.open(out / f"{stem}_{kind}.png")
            # the picture at twice the image's size, its legend under it
            assert pic.mode == "RGB" and pic.size[0] == 2 * size[0] and pic.size[1] > 2 * size[1]
        labels = np.array(Image.open(out / f"{stem}_label.png"))
        assert labels.shape == size[::-1] and labels.max() < 4
    assert (out / "vocabulary.txt").read_text().split("\n")[:4] == [
        "0\tred star",
        "1\tblue circle",
        "2\tgrass",
        "3\tsky",
    ]


def test_demo_single_class_name_gets_others(images, tmp_path):
    folder, stems = images
    out = tmp_path / "one"
    _demo().main(
        [
            "--config-file",
            CONFIG,
            "--input",
            str(folder / f"{stems[0]}.png"),
            "--vocabulary",
            "red star",
            "--output",
            str(out),
            "--labels",
            *OPTS,
        ]
    )
    assert (out / "vocabulary.txt").read_text() == "0\tred star\n1\tothers\n"
    assert np.array(Image.open(out / f"{stems[0]}_label.png")).max() <= 1
    assert (out / f"{stems[0]}_sem.png").is_file() and (out / f"{stems[0]}_pan.png").is_file()


def test_demo_errors(images, tmp_path):
    demo = _demo()
    with pytest.raises(ValueError, match="no class name"):
        demo.parse_vocabulary(" , ,")
    with pytest.raises(FileNotFoundError, match="matches no image"):
        demo.expand_inputs([str(tmp_path / "nothing*.jpg")])


# ---- bad input (issue 23) ------------------------------------------------------------------------
def _main(demo, folder, out, vocabulary, *extra):
    return demo.main(
        [
            "--config-file",
            CONFIG,
            "--input",
            str(folder),
            "--vocabulary",
            vocabulary,
            "--output",
            str(out),
            "--labels",
            *extra,
            *OPTS,
        ]
    )


def test_rerun_with_another_vocabulary_refuses_or_rewrites(images, tmp_path):
    """Case 2: the old label PNGs stayed beside a new vocabulary.txt."""
    folder, stems = images
    demo, out = _demo(), tmp_path / "out"
    first = _main(demo, folder, out, "red star,grass,sky")
    assert first["written"] == 2
    assert _main(demo, folder, out, "red star,grass,sky")["existing"] == 2  # same run: kept
    with pytest.raises(demo.StaleOutputError, match="different vocabulary"):
        _main(demo, folder, out, "blue circle,grass")
    assert (out / "vocabulary.txt").read_text().startswith("0\tred star\n")  # untouched
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / f"{stems[0]}.png", one)
    second = _main(demo, one, out, "blue circle,grass", "--overwrite")
    assert second["written"] == 1
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"{stems[0]}_{k}.png" for k in ("label", "pan", "sem")
    ]  # the other image's outputs of the first run are gone
    assert (out / "vocabulary.txt").read_text() == "0\tblue circle\n1\tgrass\n"


def test_a_missing_vocabulary_file_is_an_error_not_a_class_name(images, tmp_path):
    """Case 8: 'names.txt' (mistyped) became the single class "names.txt" + "others"."""
    folder, _ = images
    for arg in (str(tmp_path / "nmaes.txt"), "nmaes.txt", "./voc/names"):
        with pytest.raises(FileNotFoundError, match="looks like a file path"):
            _main(_demo(), folder, tmp_path / "out", arg)
    assert not (tmp_path / "out").exists()


def test_vocabulary_names_are_normalised_and_near_duplicates_refused(images, tmp_path):
    """Case 9: "Sky" and "sky " were two classes; a tab broke vocabulary.txt."""
    folder, stems = images
    demo = _demo()
    with pytest.raises(ValueError, match="near-duplicate.*'sky'.*'sky'"):
        _main(demo, folder, tmp_path / "a", "Sky,grass,sky ")
    names = tmp_path / "names.txt"
    names.write_text("red star\ngrass\tsky\n")
    with pytest.raises(ValueError, match=f"{names}:2.*tab"):
        _main(demo, folder, tmp_path / "b", str(names))
    _main(demo, folder / f"{stems[0]}.png", tmp_path / "c", "  Red   Star , GRASS")
    assert (tmp_path / "c" / "vocabulary.txt").read_text() == "0\tred star\n1\tgrass\n"


def test_a_corrupt_image_is_skipped_with_a_warning_and_counted(images, tmp_path, caplog):
    """Case 10 (demo): one corrupt image aborted the whole run without naming it."""
    folder, stems = images
    mixed = tmp_path / "in"
    shutil.copytree(folder, mixed)
    bad = mixed / "broken.jpg"
    bad.write_bytes((mixed / f"{stems[0]}.png").read_bytes()[:64])
    demo = _demo()
    summary = _main(demo, mixed, tmp_path / "out", "red star,grass")
    assert summary["written"] == 2 and len(summary["skipped"]) == 1
    assert str(bad) in summary["skipped"][0]
    assert any(r.getMessage().startswith("1 of 3 images skipped") for r in caplog.records)
    assert not list((tmp_path / "out").glob("broken_*"))
    with pytest.raises(OSError, match=str(bad)):
        _main(demo, mixed, tmp_path / "strict", "red star,grass", "--strict")


def test_no_surviving_proposal_is_reported_not_painted_class_0(images, tmp_path, caplog):
    """Case 7: with no proposal left (CLIP only, every binarised mask empty), every pixel got
    class 0 silently."""
    folder, stems = images
    out = tmp_path / "out"
    summary = _main(
        _demo(),
        folder,
        out,
        "red star,grass",
        "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
        "1.0",
        "MODEL.CLIP.MASK_THR",
        "1.0",
    )
    assert len(summary["unlabelled"]) == 2
    assert any("no proposal survived" in r.getMessage() for r in caplog.records)
    labels = np.array(Image.open(out / f"{stems[0]}_label.png"))
    assert (labels == 255).all()


def test_an_image_too_large_for_memory_is_refused_with_the_numbers(images, tmp_path):
    """Case 6: memory grows with names x pixels; an image that cannot fit is skipped with the
    numbers (or stops the run with --strict) instead of killing the process."""
    folder, stems = images
    demo = _demo()
    demo.available_memory_bytes = lambda: 100_000  # 100 kB free
    summary = _main(demo, folder, tmp_path / "out", "red star,grass,sky")
    assert summary["written"] == 0 and len(summary["skipped"]) == 2
    msg = summary["skipped"][0]
    assert "MP" in msg and "3 class names" in msg and "GiB" in msg and "free" in msg
    with pytest.raises(MemoryError, match="fewer names or a smaller image"):
        _main(demo, folder, tmp_path / "strict", "red star,grass,sky", "--strict")
    assert demo.output_bytes(3000, 4000, 69, 16, 1.0) > 4 * 2**30  # 12 MP x 69 names: > 4 GiB


# ---- readable pictures (issue 26) ----------------------------------------------------------------
def test_side_by_side_pictures_and_a_summary_line_per_image(images, tmp_path, capsys):
    folder, stems = images
    demo, out = _demo(), tmp_path / "out"
    _main(demo, folder, out, "Red Star,grass,sky", "--side-by-side", "--scale", "3")
    lines = [line for line in capsys.readouterr().out.splitlines() if "names)" in line]
    assert len(lines) == 2  # one per image: the names found with their shares
    for stem, line in zip(stems, lines):
        assert line.startswith(str(folder / f"{stem}.png") + ": ") and "%" in line
        assert line.endswith("of 3 names)")
        image = np.array(Image.open(folder / f"{stem}.png").convert("RGB"))
        h, w = image.shape[:2]
        pic = np.array(Image.open(out / f"{stem}_sem.png"))
        assert pic.shape[1] > 2 * 3 * w and pic.shape[0] > 3 * h  # image | segmentation, legend
        assert (pic[: 3 * h : 3, : 3 * w : 3] == image).all()  # the plain image on the left
    with pytest.raises(demo.StaleOutputError, match="different side_by_side"):
        _main(demo, folder, out, "Red Star,grass,sky", "--scale", "3")


def test_nothing_found_is_said_on_the_console_and_on_the_picture(images, tmp_path, capsys):
    folder, stems = images
    out = tmp_path / "out"
    opts = ["MODEL.TWO_STAGE.ENSEMBLE_WEIGHT", "1.0", "MODEL.CLIP.MASK_THR", "1.0"]
    _main(_demo(), folder / f"{stems[0]}.png", out, "red star,grass", *opts)
    line = [x for x in capsys.readouterr().out.splitlines() if "NOTHING FOUND" in x]
    assert len(line) == 1 and "no proposal survived (MODEL.CLIP.MASK_THR 1.0" in line[0]
    image = np.array(Image.open(folder / f"{stems[0]}.png").convert("RGB"))
    for kind in ("sem", "pan"):
        pic = np.array(Image.open(out / f"{stems[0]}_{kind}.png"))
        top = pic[: image.shape[0]]
        # nothing blended over the image, but a dark banner across its top says so
        assert (top[-1] == image[-1]).all() and (top[0] != image[0]).any()
