"""PACL through tools/train_net.py on the tiny toy world: a few training steps, then --eval-only for
PACL and for the vanilla-patch baseline (random-init CLIP: only the plumbing and the metrics are
checked).
"""

import json

import torch
from helpers import REPO, assert_sem_seg_consistent
from helpers import run_train_net as _run

COMMON = [
    "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "8", "RUNTIME.LOG_PERIOD", "1",
    "MODEL.PACL.TEST.INFER_STRIDE", "4", "RUNTIME.NUM_THREADS", "1",
]  # fmt: skip


def test_pacl_train_then_eval(toyworld_root, tmp_path):
    out = tmp_path / "pacl"
    cfg = str(REPO / "configs/toyworld/pacl.yaml")
    _run(["--config-file", cfg, *COMMON, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "3",
          "SOLVER.WARMUP_ITERS", "1"])  # fmt: skip
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    losses = [m for m in metrics if "total_loss" in m]
    assert len(losses) == 3
    assert all(set(m) >= {"loss_pacl_caption", "loss_pacl_noun"} for m in losses)
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert "logit_scale" in state and any(k.startswith("embedder.") for k in state)
    results = _run(["--config-file", cfg, "--eval-only", *COMMON, "OUTPUT_DIR", str(out),
                    "MODEL.WEIGHTS", str(out / "model_final.pth")])  # fmt: skip
    assert_sem_seg_consistent(results["sem_seg"], "toyworld_sem_seg_val")

    vanilla = str(REPO / "configs/toyworld/pacl_vanilla.yaml")
    results = _run(["--config-file", vanilla, "--eval-only", *COMMON, "OUTPUT_DIR",
                    str(tmp_path / "vanilla")])  # fmt: skip
    assert_sem_seg_consistent(results["sem_seg"], "toyworld_sem_seg_val")
