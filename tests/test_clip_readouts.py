"""ov_seg.evaluation.clip_readouts and tools/probe_clip_readouts.py."""

import json

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import load_tool

from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.evaluation.clip_readouts import CROP_READOUTS, clip_readouts
from ov_seg.modeling.clip import build_clip


def test_every_readout_scores_every_thing_region(toyworld_root, tmp_path):
    meta = MetadataCatalog.get("toyworld_sem_seg_val")
    clip = build_clip("ovseg-tiny-vit8-64").eval()
    results = clip_readouts(clip, "toyworld_sem_seg_val", ["a photo of a {}"], num_images=4)
    expected = set(CROP_READOUTS) | {"unmasked crop x1"}
    for s in (64, 128):
        expected |= {
            f"masked scene, {s} px",
            f"dense tokens, {s} px",
            f"dense tokens (value path), {s} px",
        }
    assert set(results) == expected
    things = set(meta.seen_class_ids + meta.unseen_class_ids) - {
        i for i, c in enumerate(meta.class_attributes["colour"]) if c < 0
    }
    seen = unseen = 0
    for d in DatasetCatalog.get("toyworld_sem_seg_val")[:4]:
        for c in np.unique(read_label_image(d["sem_seg_file_name"])):
            if int(c) in things:
                seen += int(c) in meta.seen_class_ids
                unseen += int(c) in meta.unseen_class_ids
    for m in results.values():
        assert (m["segments_seen"], m["segments_unseen"]) == (seen, unseen)

    tool = load_tool("probe_clip_readouts")
    ckpt = tmp_path / "clip.pth"
    from ov_seg.modeling.clip.builder import save_clip_checkpoint

    save_clip_checkpoint(str(ckpt), clip)
    out = tmp_path / "readouts.json"
    tool.main(
        ["--clip", str(ckpt), "--num-images", "2", "--scene-sizes", "64", "--threads", "1"]
        + ["--output", str(out)]
    )
    saved = json.loads(out.read_text())
    assert "masked crop x1" in saved and "dense tokens, 64 px" in saved
