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
            assert pic.mode == "RGB" and pic.size == (2 * size[0], 2 * size[1])
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
