"""tools/web_demo.py without a browser: the main job's models it serves by default, the fast
switch's options, the message when there is no model (the page itself: test_web_demo_browser.py)."""

import json

import pytest
import torch
from helpers import REPO, load_tool

from ov_seg.engine.methods import parse_method_spec


def test_default_models_are_those_the_main_job_trained(tmp_path):
    web_demo = load_tool("web_demo")
    out = tmp_path / "output"
    assert web_demo.main_job_methods(out) == []
    for f in ("proposals/model_final.pth", "clip_mpt/clip_export.pth", "mgca/model_final.pth"):
        (out / f).parent.mkdir(parents=True)
        (out / f).write_bytes(b"")
    (out / "two_stage_search").mkdir()
    pick = {"ensemble_weight": 0.8, "mask_thr": 0.45, "gamma": 4.0}
    searched = {"ensemble_weight": 0.6, "mask_thr": 0.35, "gamma": 0.0}
    record = {"best": pick, "cross_validated": {"searched": {"picks": [searched, pick]}}}
    (out / "two_stage_search" / "search.json").write_text(json.dumps(record))
    specs = [parse_method_spec(s) for s in web_demo.main_job_methods(out)]
    assert [s[0] for s in specs] == ["two-stage OVSeg", "MGCA"]  # PACL, MixReorg: not trained
    name, config, weights, opts = specs[0]
    assert config == str(REPO / "configs/toyworld/two_stage_R18.yaml") and weights == ""
    options = dict(zip(opts[::2], opts[1::2]))
    assert options["MODEL.TWO_STAGE.PROPOSAL_WEIGHTS"] == str(out / "proposals/model_final.pth")
    assert options["MODEL.CLIP.PRETRAINED"] == str(out / "clip_mpt/clip_export.pth")
    # the uncalibrated search pick (the first fold's), no seen-class calibration
    assert options["MODEL.TWO_STAGE.ENSEMBLE_WEIGHT"] == "0.6"
    assert options["MODEL.CLIP.MASK_THR"] == "0.35"
    assert "MODEL.SEEN_CALIBRATION.GAMMA" not in options
    assert specs[1][2] == str(out / "mgca/model_final.pth")


def test_fast_switch_options_come_from_the_fast_config():
    web_demo = load_tool("web_demo")
    opts = web_demo.fast_options(str(REPO / web_demo.FAST_CONFIG))
    options = dict(zip(opts[::2], opts[1::2]))
    assert options["MODEL.TWO_STAGE.FAST.QUANTIZE"] == "int8_dynamic"
    assert options["MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS"] == 0.5
    assert all(k.startswith("MODEL.TWO_STAGE.FAST.") for k in options)
    assert web_demo.fast_options("") == []


def test_no_trained_model_is_a_clear_error(tmp_path):
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="no trained model in .*make demo.*--method"):
            load_tool("web_demo").main(["--output-dir", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
