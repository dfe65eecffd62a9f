"""``TEST.MEMORY_BUDGET_MB``: every model gives the same labels (and two-stage panoptic segments)
with a budget too small for its dense outputs as without a budget; the demo's predictor and the
evaluator take the label maps."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from helpers import setup_config
from test_evaluation_open_vocab_sem_seg import make_dataset, run

from ov_seg.engine import Trainer
from ov_seg.engine.predictor import NO_LABEL, OVSegPredictor
from ov_seg.evaluation import OpenVocabSemSegEvaluator
from ov_seg.modeling.meta_arch.mixreorg import MixReorg
from ov_seg.modeling.postprocess import semantic_output
from ov_seg.utils.semseg import label_map

CPU = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.CLIP.PRETRAINED", ""]
VOCAB = ["red star", "blue circle", "grass", "sky", "water", "yellow heart", "purple hexagon"]


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _inputs(vocabulary):
    return [  # odd output sizes, upsampled and downsampled
        {"image": _image(64, 64, 0), "height": 131, "width": 97, "vocabulary": vocabulary},
        {"image": _image(48, 80, 1), "height": 37, "width": 61, "vocabulary": vocabulary},
    ]


def _compare(model, vocabulary, panoptic=False):
    inputs = _inputs(vocabulary)
    model.output_budget = 0
    with torch.no_grad():
        dense = model(inputs)
    # 1.5 maps of the smaller output: one class a chunk
    model.output_budget = 6 * 37 * 61
    with torch.no_grad():
        bounded = model(inputs)
    for x, d, b in zip(inputs, dense, bounded):
        assert d["sem_seg"].dim() == 3 and b["sem_seg"].shape == (x["height"], x["width"])
        assert b["sem_seg"].dtype == torch.int64
        assert torch.equal(b["sem_seg"], label_map(d["sem_seg"]))
        assert b["sem_seg_empty"] == (float(d["sem_seg"].max()) <= 0)
        if panoptic:
            assert torch.equal(b["panoptic_seg"][0], d["panoptic_seg"][0])
            assert b["panoptic_seg"][1] == d["panoptic_seg"][1]


@pytest.mark.parametrize("names", [2, 7])
def test_two_stage(toyworld_root, names):
    torch.manual_seed(0)
    opts = [
        *CPU,
        "RUNTIME.NUM_THREADS", "1",
        "MODEL.TWO_STAGE.TEST.PANOPTIC_ON", "True",
        "MODEL.TWO_STAGE.TEST.OBJECT_MASK_THRESHOLD", "0.0",
        "MODEL.TWO_STAGE.TEST.OVERLAP_THRESHOLD", "0.0",
    ]  # fmt: skip
    model = build_model(setup_config("configs/toyworld/two_stage_R18.yaml", opts)).eval()
    _compare(model, VOCAB[:names], panoptic=True)


def test_mgca():
    torch.manual_seed(0)
    model = Trainer.build_model(setup_config("configs/toyworld/mgca.yaml", CPU)).eval()
    _compare(model, VOCAB)


def test_mixreorg():
    torch.manual_seed(0)
    opts = [*CPU, "MODEL.MIXREORG.NUM_GROUP_TOKENS", "[8, 4]"]
    model = MixReorg(setup_config("configs/toyworld/mixreorg.yaml", opts)).eval()
    _compare(model, VOCAB[:4])


def test_pacl():
    torch.manual_seed(0)
    model = Trainer.build_model(setup_config("configs/toyworld/pacl.yaml", CPU)).eval()
    _compare(model, VOCAB)


def test_config_budget_reaches_the_model():
    cfg = setup_config("configs/toyworld/mgca.yaml", [*CPU, "TEST.MEMORY_BUDGET_MB", "3"])
    assert Trainer.build_model(cfg).output_budget == 3 * 2**20


def test_predictor_labels_of_a_label_map():
    labels = torch.tensor([[0, 2], [1, 1]])
    out = {"sem_seg": labels, "sem_seg_empty": False, "vocabulary": ["a", "b", "c"]}
    assert OVSegPredictor.labels(out) == (labels, False)
    sem, empty = OVSegPredictor.labels({**out, "sem_seg_empty": True})
    assert empty and torch.equal(sem, torch.full((2, 2), NO_LABEL[True]))
    assert torch.equal(label_map(labels), labels)


def test_evaluator_gives_the_same_metrics_from_label_maps(tmp_path):
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 6, (37, 29)).astype(np.uint8) for _ in range(3)]
    files = make_dataset(tmp_path, "ovseg_test_bounded_outputs", gts, 6, 255)
    scores = [torch.rand(6, 9, 7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    dense = [semantic_output(s, g.shape, 0)["sem_seg"] for s, g in zip(scores, gts)]
    labels = [semantic_output(s, g.shape, 4 * 37 * 29)["sem_seg"] for s, g in zip(scores, gts)]
    assert all(d.dim() == 3 for d in dense) and all(x.dim() == 2 for x in labels)
    evaluator = OpenVocabSemSegEvaluator("ovseg_test_bounded_outputs", output_dir=str(tmp_path))
    assert run(evaluator, files, dense) == run(evaluator, files, labels)
