"""ov_seg.engine.demo_service (the web demo without the page) with tiny random models: messages for
bad requests, names as typed, cached text embeddings, the fast switch, one request at a time."""

import threading
import time

import numpy as np
import pytest
from helpers import tiny_demo_method
from PIL import Image

from ov_seg.data.vocabulary import normalize_vocabulary
from ov_seg.engine.demo_service import (
    DemoInputError,
    DemoService,
    preset_vocabularies,
    split_vocabulary,
)
from ov_seg.modeling.clip.text_classifier import TextClassifier

FAST = ["MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS", 0.5, "MODEL.TWO_STAGE.FAST.QUANTIZE", "int8_dynamic"]


@pytest.fixture(scope="module")
def service(toyworld_root):
    methods = {
        "two-stage": tiny_demo_method("configs/toyworld/two_stage_R18.yaml", FAST),
        "PACL": tiny_demo_method("configs/toyworld/pacl.yaml"),
    }
    return DemoService(methods, max_names=5, max_side=100)


@pytest.fixture(scope="module")
def toy_image(toyworld_root):
    return str(sorted((toyworld_root / "val" / "images").iterdir())[0])


def test_split_vocabulary_keeps_spelling_and_commas_within_lines():
    assert split_vocabulary(" Red  Star, grass ,,sky ") == ["Red Star", "grass", "sky"]
    assert split_vocabulary("building, edifice\nsky\n\n") == ["building, edifice", "sky"]
    assert split_vocabulary(" , \n ") == []


def test_presets_are_the_registered_benchmark_vocabularies(toyworld_root):
    presets = preset_vocabularies()
    assert list(presets)[0] == "toy world" and "red star" in split_vocabulary(presets["toy world"])
    for label, text in presets.items():
        names = split_vocabulary(text)
        n = int(label.split("(")[1].rstrip(")")) if "(" in label else len(names)
        assert len(names) == n, label  # names holding commas stay whole
        assert len(normalize_vocabulary(names)) == n, label  # and the model takes them
    assert "ADE20K (847)" in presets and "ADE20K (847)" not in preset_vocabularies(500)


def test_bad_requests_get_clear_messages(service, toy_image, tmp_path):
    with pytest.raises(DemoInputError, match="vocabulary is empty"):
        service.segment(toy_image, " , ")
    with pytest.raises(DemoInputError, match="6 names; this demo takes at most 5"):
        service.segment(toy_image, "a, b, c, d, e, f")
    with pytest.raises(DemoInputError, match="near-duplicate.*'sky'"):
        service.segment(toy_image, "Sky, grass, sky")
    with pytest.raises(DemoInputError, match="No image"):
        service.segment(None, "sky")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DemoInputError, match="not a readable image"):
        service.segment(str(broken), "sky, grass")
    with pytest.raises(DemoInputError, match="Unknown model 'x'; loaded: two-stage, PACL"):
        service.segment(toy_image, "sky", method="x")


def test_a_request_draws_the_typed_names_and_lists_every_share(service, toy_image):
    result = service.segment(toy_image, "Red Star, grass, sky")
    assert len(result.table) == 3
    assert {name for name, _ in result.table} == {"Red Star", "grass", "sky"}  # as typed
    shares = [float(s.rstrip("%").lstrip("<")) for _, s in result.table]
    assert shares == sorted(shares, reverse=True) and 99 <= sum(shares) <= 101
    assert result.picture.ndim == 3 and result.picture.shape[1] == 64 * 7  # 64 px -> 448 px
    assert result.message.startswith("two-stage (exact, ") and "of 3 names" in result.message
    single = service.segment(toy_image, "Red Star")  # the background name is appended
    assert {n for n, _ in single.table} == {"Red Star", "others"} == set(single.vocabulary)
    pan = service.segment(toy_image, "red star, grass, sky", view="panoptic", side_by_side=True)
    assert pan.picture.shape[1] > 2 * 448
    pacl = service.segment(toy_image, "red star, grass, sky", method="PACL", view="panoptic")
    assert "PACL gives no panoptic output: semantic shown" in pacl.message


def test_text_embeddings_are_cached_across_requests(service, toy_image, monkeypatch):
    encoded = []
    original = TextClassifier.encode_prompts  # every class name's prompts go through it

    def counting(self, names):
        encoded.extend(names)
        return original(self, names)

    monkeypatch.setattr(TextClassifier, "encode_prompts", counting)
    service.segment(toy_image, "zebra, giraffe")
    first = len(encoded)
    assert first > 0
    service.segment(toy_image, "zebra, giraffe")
    assert len(encoded) == first  # same vocabulary: nothing embedded again
    service.segment(toy_image, "zebra, giraffe, lion")
    assert encoded[first:] and all("lion" in t for t in encoded[first:])  # only the new name


def test_fast_switch(service, toy_image):
    exact = service.methods["two-stage"].predictor(False)
    fast = service.methods["two-stage"].predictor(True)
    assert fast is not exact and fast is service.methods["two-stage"].predictor(True)
    assert fast.cfg.MODEL.TWO_STAGE.FAST.QUANTIZE == "int8_dynamic"
    assert exact.cfg.MODEL.TWO_STAGE.FAST.QUANTIZE == "none"
    result = service.segment(toy_image, "red star, grass, sky", fast=True)
    assert result.message.startswith("two-stage (fast, ")
    pacl = service.segment(toy_image, "red star, grass", method="PACL", fast=True)
    assert pacl.message.startswith("PACL (exact, ") and "PACL has no fast modes" in pacl.message


def test_large_uploads_are_reduced(service, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 300, 3), np.uint8)).save(big)
    result = service.segment(str(big), "sky, grass")
    assert "reduced from 300x150 to 100x50" in result.message
    assert result.picture.shape[1] == 100 * 4  # 100 px, enlarged 4x for reading


def test_requests_run_one_at_a_time(service, toy_image, monkeypatch):
    predictor = service.methods["PACL"].exact
    running, overlaps = [], []
    original = type(predictor).__call__

    def slow(self, *args, **kwargs):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.2)
        out = original(self, *args, **kwargs)
        running.pop()
        return out

    monkeypatch.setattr(type(predictor), "__call__", slow)
    threads = [
        threading.Thread(target=service.segment, args=(toy_image, "sky, grass", "PACL"))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]


def test_nothing_found_is_said(toyworld_root, toy_image):
    """No proposal survives (CLIP only, every binarised mask empty): the line and the picture say
    so, the table lists every name at 0%."""
    opts = ["MODEL.TWO_STAGE.ENSEMBLE_WEIGHT", "1.0", "MODEL.CLIP.MASK_THR", "1.0"]
    method = tiny_demo_method("configs/toyworld/two_stage_R18.yaml", opts=opts)
    result = DemoService({"strict": method}).segment(toy_image, "red star, grass")
    assert "NOTHING FOUND (no proposal survived (MODEL.CLIP.MASK_THR 1.0" in result.message
    assert result.table == [("red star", "0%"), ("grass", "0%")]
    image = np.asarray(Image.open(toy_image).convert("RGB"))
    top = result.picture[: 7 * 64]
    assert top[:10].mean() < np.kron(image, np.ones((7, 7, 1), np.uint8))[:10].mean()  # banner
