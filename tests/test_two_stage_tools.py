"""tools/merge_checkpoints.py and tools/search_ensemble.py with tiny random models (toy world)."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from helpers import REPO, load_tool, setup_config

from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.data import build_dataset_mapper
from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.evaluation.open_vocab_sem_seg import sem_seg_metrics
from ov_seg.modeling.clip import clip_activation, save_clip_checkpoint

CONFIG = "configs/toyworld/two_stage_R18.yaml"
OPTS = ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]


def test_merged_checkpoint_round_trip(toyworld_root, tmp_path):
    torch.manual_seed(0)
    # a QuickGELU CLIP: the export records it, the merged checkpoint too, and the model rebuilt
    # from the merged file alone (PRETRAINED "", ACTIVATION "auto") gets it back
    cfg = setup_config(CONFIG, [*OPTS, "MODEL.CLIP.ACTIVATION", "quick_gelu"])
    model = build_model(cfg)
    proposals = tmp_path / "proposals.pth"
    torch.save({"model": model.proposal_source.model.state_dict(), "iteration": 7}, proposals)
    clip = model.crop_classifier.clip
    visual = clip.visual
    grid = visual.grid_size[0] * visual.grid_size[1]
    prompts = torch.randn(cfg.MODEL.CLIP.MASK_PROMPT_DEPTH, grid, visual.conv1.out_channels)
    clip_path = tmp_path / "clip_export.pth"
    save_clip_checkpoint(str(clip_path), clip, mask_prompts=prompts)
    merged = tmp_path / "merged.pth"
    # verification inside the tool rebuilds the model from the merged file and compares every tensor
    load_tool("merge_checkpoints").main(
        [
            "--config-file",
            str(REPO / CONFIG),
            "--output",
            str(merged),
            *OPTS[2:],
            "MODEL.TWO_STAGE.PROPOSAL_WEIGHTS",
            str(proposals),
            "MODEL.CLIP.PRETRAINED",
            str(clip_path),
        ]
    )
    opts = ["MODEL.WEIGHTS", str(merged), *OPTS]
    reloaded = build_model(setup_config(CONFIG, opts))
    SafeCheckpointer(reloaded).load(str(merged))
    assert torch.equal(reloaded.crop_classifier.encoder.prompts, prompts)
    assert clip_activation(reloaded.crop_classifier.clip) == "quick_gelu"
    for key, value in model.proposal_source.model.state_dict().items():
        assert torch.equal(reloaded.proposal_source.model.state_dict()[key], value), key
    for key, value in clip.state_dict().items():
        assert torch.equal(reloaded.crop_classifier.clip.state_dict()[key], value), key


def test_search_matches_the_model_forward(toyworld_root, tmp_path):
    out = tmp_path / "search"
    args = ["--config-file", str(REPO / CONFIG), "--output", str(out), "--weights", "0,0.5,1"]
    args += ["--mask-thrs", "0.4,0.6", "--gammas", "0,2", "--seen-weights", "0.2"]
    args += ["--subset", "1:4"]
    torch.manual_seed(0)
    load_tool("search_ensemble").main([*args, *OPTS])
    result = json.loads((out / "search.json").read_text())
    grid = {
        (r["ensemble_weight"], r["seen_ensemble_weight"], r["mask_thr"], r["gamma"]): r
        for r in result["grid"]
    }
    assert len(grid) == 16 and result["num_images"] == 3  # λ_s 0.2 only with λ 0.5
    # λ = 0 ignores MASK_THR
    assert grid[(0.0, None, 0.4, 2.0)] == {**grid[(0.0, None, 0.6, 2.0)], "mask_thr": 0.4}
    # the cached re-scoring equals the model's own forward at grid points (seen-calibrated), with
    # λ_s = λ and with the seen names' own λ_s
    for seen_weight in (None, 0.2):
        opts = (
            OPTS if seen_weight is None else [*OPTS, "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT", "0.2"]
        )
        expected, _ = _forward_metrics(opts, 0.5, 0.6, 2.0, slice(1, 4))
        for key in ("mIoU", "mIoU-seen", "mIoU-unseen"):
            got = grid[(0.5, seen_weight, 0.6, 2.0)][key]
            assert np.isclose(got, expected[key], equal_nan=True), (seen_weight, key)
    # resume: the finished search is reloaded, not recomputed
    best = load_tool("search_ensemble").main([*args, "--resume", *OPTS])
    assert best == result["best"]


def _forward_metrics(opts, weight, mask_thr, gamma, subset):
    """sem_seg metrics of the model's own forward (seed 0) on ``subset`` of the toy val split, and
    the (K, H, W) sem_seg scores of its first image."""
    torch.manual_seed(0)
    cfg = setup_config(
        CONFIG,
        [
            *opts,
            "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
            str(weight),
            "MODEL.CLIP.MASK_THR",
            str(mask_thr),
            "MODEL.SEEN_CALIBRATION.GAMMA",
            str(gamma),
        ],
    )
    model = build_model(cfg).eval()
    name = "toyworld_sem_seg_val"
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name=name)
    classes = MetadataCatalog.get(name).stuff_classes
    n = len(classes) + 1
    conf = np.zeros((n, n), dtype=np.int64)
    scores = []
    for d in DatasetCatalog.get(name)[subset]:
        scores.append(model([mapper(d)])[0]["sem_seg"])
        pred = scores[-1].argmax(0).numpy()
        gt = read_label_image(d["sem_seg_file_name"])
        gt[gt == 255] = n - 1
        conf += np.bincount(n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n).reshape(n, n)
    meta = MetadataCatalog.get(name)
    return sem_seg_metrics(conf, classes, meta.seen_class_ids, meta.unseen_class_ids), scores[0]


FAST_OPTS = [
    "MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS",
    "0.5",
    "MODEL.TWO_STAGE.FAST.DUPLICATE_IOU",
    "0.6",
    "MODEL.TWO_STAGE.FAST.CROP_SIZE",
    "32",
    "MODEL.TWO_STAGE.FAST.QUANTIZE",
    "int8_dynamic",
]


def test_search_runs_the_fast_modes_as_the_model_forward(toyworld_root, tmp_path):
    """A fast mode's grid cell equals the forward of the model with that fast mode."""
    out = tmp_path / "search"
    args = ["--config-file", str(REPO / CONFIG), "--output", str(out), "--weights", "0,0.5"]
    args += ["--mask-thrs", "0.5", "--gammas", "0,1", "--subset", "0:3"]
    torch.manual_seed(0)
    load_tool("search_ensemble").main([*args, *OPTS, *FAST_OPTS])
    grid = json.loads((out / "search.json").read_text())["grid"]
    cell = next(r for r in grid if (r["ensemble_weight"], r["gamma"]) == (0.5, 1.0))
    expected, fast_scores = _forward_metrics([*OPTS, *FAST_OPTS], 0.5, 0.5, 1.0, slice(0, 3))
    for key in ("mIoU", "mIoU-seen", "mIoU-unseen"):
        assert np.isclose(cell[key], expected[key], equal_nan=True), key
    # the fast mode is really on: its scores differ from the exact mode's
    _, exact_scores = _forward_metrics(OPTS, 0.5, 0.5, 1.0, slice(0, 1))
    assert not torch.allclose(fast_scores, exact_scores, atol=1e-4)


def test_search_holdout_scores_the_held_out_images(toyworld_root, tmp_path):
    base = ["--config-file", str(REPO / CONFIG), "--weights", "0,0.5,1", "--mask-thrs", "0.5"]
    torch.manual_seed(0)
    load_tool("search_ensemble").main(
        [*base, "--output", str(tmp_path / "a"), "--subset", "0:2", "--holdout", "2:4", *OPTS]
    )
    torch.manual_seed(0)
    load_tool("search_ensemble").main(
        [*base, "--output", str(tmp_path / "b"), "--subset", "2:4", *OPTS]
    )
    both = json.loads((tmp_path / "a" / "search.json").read_text())
    alone = json.loads((tmp_path / "b" / "search.json").read_text())
    assert both["num_images"] == 2 and both["holdout"]["num_images"] == 2
    # the held-out grid is exactly a search over those images alone
    assert both["holdout"]["grid"] == alone["grid"]
    pick = (both["best"]["ensemble_weight"], both["best"]["mask_thr"])
    assert (both["holdout"]["best"]["ensemble_weight"], both["holdout"]["best"]["mask_thr"]) == pick
    with pytest.raises(SystemExit, match="overlap"):
        load_tool("search_ensemble").main(
            [*base, "--output", str(tmp_path / "c"), "--subset", "0:3", "--holdout", "2:4", *OPTS]
        )


def test_cross_validation_picks_on_one_set_and_scores_the_other():
    """Hand-built confusion matrices: each selection is picked on one image set and scored on the
    other, and the two held-out matrices are pooled."""
    from ov_seg.evaluation.open_vocab_sem_seg import sem_seg_metrics

    tool = load_tool("search_ensemble")
    rng = np.random.default_rng(0)
    weights, thrs, gammas, classes = [0.0, 0.5, 0.7, 1.0], [0.35, 0.45], [0.0, 2.0], ["a", "b", "c"]
    n = len(classes) + 1
    # (set, MASK_THR, γ, λ, prediction, truth): noisy confusions, then clear winners per set
    conf = rng.integers(0, 20, size=(2, len(thrs), len(gammas), len(weights), n, n))
    diag = (np.arange(n), np.arange(n))
    conf[(..., *diag)] += 40
    conf[(0, 1, 0, 1, *diag)] += 1000  # set 0: best uncalibrated ensemble (0.45, λ 0.5)
    conf[(1, 0, 0, 2, *diag)] += 1000  # set 1: best uncalibrated ensemble (0.35, λ 0.7)
    conf[(1, 0, 0, 3, *diag)] += 2000  # set 1: λ = 1 is better still, but not an ensemble
    conf[(0, 0, 1, 2, *diag)] += 3000  # set 0: best of all, calibrated (0.35, γ 2, λ 0.7)
    fusions = tool.fusion_grid(weights)
    assert fusions == [(w, None) for w in weights]
    cv = tool.cross_validate(conf, fusions, thrs, gammas, "mIoU", classes, None, None)
    assert cv["searched"]["picks"] == [
        {"ensemble_weight": 0.5, "seen_ensemble_weight": None, "mask_thr": 0.45, "gamma": 0.0},
        {"ensemble_weight": 0.7, "seen_ensemble_weight": None, "mask_thr": 0.35, "gamma": 0.0},
    ]
    pooled = conf[1, 1, 0, 1] + conf[0, 0, 0, 2]
    assert np.isclose(cv["searched"]["mIoU"], sem_seg_metrics(pooled, classes, None, None)["mIoU"])
    assert cv["searched_calibrated"]["picks"][0] == {
        "ensemble_weight": 0.7,
        "seen_ensemble_weight": None,
        "mask_thr": 0.35,
        "gamma": 2.0,
    }
    # a fixed λ only chooses its MASK_THR (and γ when calibrated)
    assert {p["ensemble_weight"] for p in cv["lambda_0"]["picks"]} == {0.0}
    assert {p["gamma"] for p in cv["lambda_1"]["picks"]} == {0.0}
    assert cv["lambda_1"]["picks"][1] == {
        "ensemble_weight": 1.0,
        "seen_ensemble_weight": None,
        "mask_thr": 0.35,
        "gamma": 0.0,
    }
    # without γ > 0 in the grid there are no calibrated selections
    cv = tool.cross_validate(conf[:, :, :1], fusions, thrs, [0.0], "mIoU", classes, None, None)
    assert set(cv) == {"lambda_0", "lambda_1", "searched"}


def test_seen_weight_grid_and_selections():
    """λ_s pairs only with ensemble λ; "searched" picks among all λ_s, "searched_uniform" only
    among λ_s = λ, and the branches never take a λ_s."""
    tool = load_tool("search_ensemble")
    fusions = tool.fusion_grid([0.0, 0.6, 0.7, 1.0], [0.3, 0.7])
    assert fusions == [
        (0.0, None),
        (0.6, None),
        (0.6, 0.3),
        (0.6, 0.7),
        (0.7, None),
        (0.7, 0.3),  # 0.7 itself is the uniform ensemble, listed once as (0.7, None)
        (1.0, None),
    ]
    classes = ["a", "b", "c"]
    n = len(classes) + 1
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 20, size=(2, 1, 1, len(fusions), n, n))
    diag = (np.arange(n), np.arange(n))
    conf[(..., *diag)] += 40
    conf[(slice(None), 0, 0, 2, *diag)] += 1000  # (0.6, 0.3) is best on both sets
    conf[(slice(None), 0, 0, 4, *diag)] += 500  # (0.7, None): the best uniform ensemble
    conf[(slice(None), 0, 0, 0, *diag)] += 2000  # λ 0 is better still, but a branch
    cv = tool.cross_validate(conf, fusions, [0.5], [0.0], "mIoU", classes, None, None)
    assert set(cv) == {"lambda_0", "lambda_1", "searched", "searched_uniform"}
    assert {(p["ensemble_weight"], p["seen_ensemble_weight"]) for p in cv["searched"]["picks"]} == {
        (0.6, 0.3)
    }
    assert {
        (p["ensemble_weight"], p["seen_ensemble_weight"]) for p in cv["searched_uniform"]["picks"]
    } == {(0.7, None)}
    assert {p["seen_ensemble_weight"] for p in cv["lambda_0"]["picks"]} == {None}
