"""A short CPU training run through tools/train_net.py on the toy world; then --eval-only reports
mIoU."""

import json

import pytest
from helpers import REPO, assert_sem_seg_consistent
from helpers import run_train_net as _run


@pytest.mark.slow
def test_semseg_train_then_eval(toyworld_root, tmp_path):
    out = tmp_path / "run"
    cfg_file = str(REPO / "configs/toyworld/semseg_R18.yaml")
    common = ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "4"]
    _run(
        [
            "--config-file",
            cfg_file,
            *common,
            "SOLVER.MAX_ITER",
            "20",
            "SOLVER.WARMUP_ITERS",
            "5",
            "SOLVER.BASE_LR",
            "0.003",
            "RUNTIME.LOG_PERIOD",
            "5",
        ]
    )
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
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
    # the summary follows from the per-class IoUs of the run (seen / unseen split included)
    assert_sem_seg_consistent(results["sem_seg"], "toyworld_sem_seg_val")
    assert "fwIoU" in results["sem_seg"]
