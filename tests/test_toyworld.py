"""The toy world: determinism, consistent annotations, open-vocabulary split."""

import json

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ov_seg.data.toyworld import CATEGORIES, ToyWorldSpec, render_image
from ov_seg.data.toyworld.categories import COLORS, SHAPES, is_unseen

UNSEEN_NAMES = {c.name for c in CATEGORIES if c.isthing and not c.seen}


def test_split_definition():
    things = [c for c in CATEGORIES if c.isthing]
    assert len(things) == 64 and len(UNSEEN_NAMES) == 16
    for ci in range(len(COLORS)):  # every colour keeps 6 seen shapes
        assert sum(not is_unseen(ci, si) for si in range(len(SHAPES))) == 6
    for si in range(len(SHAPES)):  # every shape is unseen for exactly 2 colours
        assert sum(is_unseen(ci, si) for ci in range(len(COLORS))) == 2


@pytest.mark.parametrize("split", ["train", "val", "web"])
def test_render_deterministic(split):
    spec = ToyWorldSpec(seed=3)
    a, b = render_image(spec, split, 5), render_image(spec, split, 5)
    assert np.array_equal(a["image"], b["image"]) and a["captions"] == b["captions"]
    c = render_image(ToyWorldSpec(seed=4), split, 5)
    assert not np.array_equal(a["image"], c["image"])


def test_generated_files_deterministic(toyworld_root, tmp_path):
    from ov_seg.data.toyworld import SplitSpec, generate_toyworld

    spec = ToyWorldSpec(image_size=64, seed=0)
    spec.splits = {"train": SplitSpec(48)}
    generate_toyworld(tmp_path, spec)
    for sub in ("images", "sem_seg", "panoptic"):
        for name in ("000000.png", "000047.png"):
            assert (tmp_path / "train" / sub / name).read_bytes() == (
                toyworld_root / "train" / sub / name
            ).read_bytes()
    assert json.loads((tmp_path / "captions_train.json").read_text()) == json.loads(
        (toyworld_root / "captions_train.json").read_text()
    )


def _check_consistency(root, split):
    pan = json.loads((root / f"panoptic_{split}.json").read_text())
    caps = json.loads((root / f"captions_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in pan["categories"]}
    caps_by_image = {}
    for a in caps["annotations"]:
        caps_by_image.setdefault(a["image_id"], []).append(a["caption"])
    for ann in pan["annotations"]:
        sem = cv2.imread(str(root / split / "sem_seg" / ann["file_name"]), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(root / split / "panoptic" / ann["file_name"]))[:, :, ::-1].astype(int)
        pid = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        seg_ids = set(np.unique(pid)) - {0}
        assert seg_ids == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            sel = pid == s["id"]
            assert sel.sum() == s["area"]
            # semantic map has the same category on every pixel of the segment
            assert set(np.unique(sem[sel])) == {s["category_id"] - 1}
        # void panoptic pixels are exactly the ignore pixels of the semantic map
        assert np.array_equal(pid == 0, sem == 255)
        thing_names = {
            names[s["category_id"]] for s in ann["segments_info"] if s["category_id"] > 5
        }
        for cap in caps_by_image[ann["image_id"]]:
            for n in thing_names:  # every visible object is named (singular or plural)
                assert n in cap, (cap, thing_names)
            for n in set(names.values()) - thing_names:
                if n in ("grass", "sky", "water", "sand", "wall"):
                    continue
                assert f" {n}" not in f" {cap}", (cap, n)


@pytest.mark.parametrize("split", ["train", "val", "web"])
def test_annotations_agree(toyworld_root, split):
    _check_consistency(toyworld_root, split)


def test_unseen_never_in_training(toyworld_root):
    for split in ("train", "web"):
        pan = json.loads((toyworld_root / f"panoptic_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in pan["categories"]}
        for ann in pan["annotations"]:
            assert not {names[s["category_id"]] for s in ann["segments_info"]} & UNSEEN_NAMES
        caps = json.loads((toyworld_root / f"captions_{split}.json").read_text())
        for a in caps["annotations"]:
            for text in (a["caption"], a.get("hard_negative", "")):
                assert not any(n in text for n in UNSEEN_NAMES), text
    val = json.loads((toyworld_root / "panoptic_val.json").read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    assert any(
        names[s["category_id"]] in UNSEEN_NAMES
        for a in val["annotations"]
        for s in a["segments_info"]
    )


def test_web_split_has_object_centric_and_hard_negatives(toyworld_root):
    caps = json.loads((toyworld_root / "captions_web.json").read_text())
    texts = [a["caption"] for a in caps["annotations"]]
    assert any(len(t.split()) <= 6 and "photo of a" in t for t in texts)
    assert sum("hard_negative" in a for a in caps["annotations"]) > len(texts) // 2


def test_registered_datasets_load(toyworld_root):
    sem = DatasetCatalog.get("toyworld_sem_seg_val")
    pan = DatasetCatalog.get("toyworld_panoptic_val")
    cap = DatasetCatalog.get("toyworld_captions_web")
    assert len(sem) == 24 and len(pan) == 24 and len(cap) == 64
    assert all(d["captions"] for d in cap)
    meta = MetadataCatalog.get("toyworld_sem_seg_val")
    assert len(meta.stuff_classes) == 69 and meta.evaluator_type
    assert set(meta.unseen_classes) == UNSEEN_NAMES


def test_missing_split_names_the_command(tmp_path):
    from ov_seg.data.datasets.register_toyworld import register_toyworld

    register_toyworld("toyworld_missing_test", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="prepare_toyworld.py"):
        DatasetCatalog.get("toyworld_missing_test_sem_seg_train")


def test_object_crops_in_context_keep_the_scene():
    """``in_context``: the object's box keeps the scene's pixels (no grey fill) and the masks mark
    the named object only; the default crop is grey outside the mask. Default web split: no
    context crops (its images do not change)."""
    from ov_seg.data.toyworld.generate import default_splits
    from ov_seg.data.toyworld.render import render_object_crop
    from ov_seg.modeling.clip.builder import CLIP_PIXEL_MEAN

    assert default_splits()["web"].context_fraction == 0.0
    grey = np.round(CLIP_PIXEL_MEAN).astype(np.uint8)
    for seed in range(5):
        plain = render_object_crop(np.random.default_rng(seed), 64)
        ctx = render_object_crop(np.random.default_rng(seed), 64, in_context=True)
        assert plain["captions"] == ctx["captions"]  # the same object
        for out in (plain, ctx):
            fg = out["sem"] != 255
            assert fg.any() and (out["pan"] > 0).sum() == fg.sum()
            assert len(out["segments"]) == 1
        outside = ~(plain["sem"] != 255)
        assert (np.abs(plain["image"][outside].astype(int) - grey).max(axis=-1) <= 1).all()
        outside = ctx["sem"] == 255
        if outside.sum() > 50:
            # scene pixels (stuff textures, other objects) around the object, not a grey fill
            assert (np.abs(ctx["image"][outside].astype(int) - grey).max(axis=-1) > 1).mean() > 0.5


def test_split_records_predating_a_field_are_not_regenerated(tmp_path):
    """A DONE record written before a ``SplitSpec`` field existed matches the field's default (the
    images are the same), so the split is skipped; a changed value regenerates it."""
    from ov_seg.data.toyworld import SplitSpec, generate_toyworld

    spec = ToyWorldSpec(image_size=64, seed=0)
    spec.splits = {"web": SplitSpec(8, object_centric_fraction=0.75)}
    first = generate_toyworld(tmp_path, spec)["web"]
    done = tmp_path / "web" / "DONE.json"
    record = json.loads(done.read_text())
    for key in ("context_fraction", "context_expand_range"):
        del record["spec"]["splits"]["web"][key]
    done.write_text(json.dumps(record))
    assert generate_toyworld(tmp_path, spec)["web"] == record  # skipped: the old record kept
    assert first["num_images"] == record["num_images"]
    spec.splits["web"].context_fraction = 0.5
    again = generate_toyworld(tmp_path, spec)["web"]
    assert again["spec"]["splits"]["web"]["context_fraction"] == 0.5  # regenerated
