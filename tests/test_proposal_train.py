"""tools/train_net.py with ProposalMaskFormer on the generated toy world: a few training iterations,
then --eval-only reports class-agnostic proposal recall (overall, seen, unseen)."""

import json
import math

import pytest
import torch
from helpers import REPO
from helpers import run_train_net as _run


@pytest.fixture
def one_thread():
    """train_net sets torch's threads from RUNTIME.NUM_THREADS: one (tiny model), restored after."""
    threads = torch.get_num_threads()
    yield ["RUNTIME.NUM_THREADS", "1"]
    torch.set_num_threads(threads)


def test_proposal_train_then_eval(toyworld_root, tmp_path, one_thread):
    out = tmp_path / "run"
    cfg_file = str(REPO / "configs/toyworld/proposal_R18.yaml")
    common = [
        *one_thread,
        "OUTPUT_DIR",
        str(out),
        "SOLVER.IMS_PER_BATCH",
        "4",
        "MODEL.MASK_FORMER.DEC_LAYERS",
        "2",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
        "8",
    ]
    _run(
        [
            "--config-file",
            cfg_file,
            *common,
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.WARMUP_ITERS",
            "2",
            "RUNTIME.LOG_PERIOD",
            "3",
            "DATASETS.TEST",
            "()",
        ]
    )  # evaluated below
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    train = [m for m in metrics if "total_loss" in m]
    assert train and all(math.isfinite(m["total_loss"]) for m in train)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= set(train[-1])
    results = _run(
        [
            "--config-file",
            cfg_file,
            "--eval-only",
            *common,
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
        ]
    )
    recall = results["proposal_recall"]
    for key in (
        "AR@10",
        "AR@50",
        "AR@100",
        "mBestIoU",
        "AR@100_seen",
        "AR@100_unseen",
        "AR@100_stuff",
    ):
        assert 0.0 <= recall[key] <= 1.0, key
    assert recall["num_gt_unseen"] > 0
    assert recall["AR@10"] <= recall["AR@50"] <= recall["AR@100"]
    # the overall recall is the segment-weighted mean of the seen / unseen and things / stuff groups
    for a_group, b_group in (("_seen", "_unseen"), ("_things", "_stuff")):
        n_a, n_b = recall[f"num_gt{a_group}"], recall[f"num_gt{b_group}"]
        assert n_a + n_b == recall["num_gt"]
        mixed = (recall[f"AR@100{a_group}"] * n_a + recall[f"AR@100{b_group}"] * n_b) / (n_a + n_b)
        assert recall["AR@100"] == pytest.approx(mixed, abs=1e-9)
    saved = json.loads(
        (out / "inference" / "toyworld_panoptic_val" / "proposal_recall.json").read_text()
    )
    assert saved["AR@100"] == recall["AR@100"]
