"""The ``MixReorg`` meta-architecture: training losses, inference, FLOPs, a train_net run."""

import copy
import json
import math

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from helpers import REPO, assert_sem_seg_consistent, run_train_net, setup_config

from ov_seg.engine import Trainer
from ov_seg.modeling.losses.mixing import make_mix_plan
from ov_seg.modeling.meta_arch.mixreorg import MixReorg

TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.MIXREORG.NUM_GROUP_TOKENS", "[8, 4]",
]  # fmt: skip
VOCAB = ["red star", "blue circle", "grass", "sky"]


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    cfg = setup_config("configs/toyworld/mixreorg.yaml", [*TINY, *opts])
    return MixReorg(cfg)


@pytest.fixture(scope="module")
def base_model():
    return _model()


def _inputs(n, seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1 if same else n, 3, 64, 64), generator=g, dtype=torch.uint8)
    caps = ["a red star on the grass", "a blue circle", "a photo of a red star", "sky"]
    return [
        {
            "image": images[0 if same else i],
            "captions": [caps[0 if same else i % len(caps)]],
            "height": 64,
            "width": 64,
        }
        for i in range(n)
    ]


def _check_backward(model, losses):
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_train_losses_and_backward(base_model):
    model = copy.deepcopy(base_model).train()
    losses = model(_inputs(4))
    assert set(losses) == {"loss_orig", "loss_rest", "loss_seg"}
    _check_backward(model, losses)
    # the progressive cross-attention (zero-initialised output) and the group tokens learn
    assert model.encoder.cross_attn[0].attn.out_proj.weight.grad.abs().sum() > 0
    assert model.encoder.stages[0].group_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())  # the text tower is frozen


def test_hard_negative_captions(base_model):
    model = copy.deepcopy(base_model).train()
    inputs = _inputs(3)
    for x in inputs:
        x["hard_negatives"] = ["a green heart"]
    texts, negatives = model.caption_embeddings(inputs)
    assert negatives is None  # HARD_NEGATIVES off by default
    model.hard_negatives = True
    texts, negatives = model.caption_embeddings(inputs)
    assert texts.shape == negatives.shape == (3, texts.shape[1])
    _check_backward(model, model(inputs))


def test_group_noun_prompt_loss(base_model):
    model = copy.deepcopy(base_model).train()
    nouns = {
        "a red star on the grass": ["red star", "grass"],
        "a blue circle": ["blue circle"],
        "a photo of a red star": ["red star"],
        "sky": [],
    }
    model.noun_weight = 1.0
    inputs = _inputs(4)
    for x in inputs:  # the caption mapper's field
        x["nouns"] = [nouns[c] for c in x["captions"]]
    emb, targets = model.noun_prompts(
        [x["captions"][0] for x in inputs], [x["nouns"][0] for x in inputs]
    )
    assert emb.shape[0] == 4 and targets.diagonal().all()
    # the prompt of image 2 is "red star", also named by image 0's caption; "sky" has no noun
    assert targets[0, 2] and not targets[1, 2] and targets.sum() >= 5
    losses = model(inputs)
    assert {"loss_noun_orig", "loss_noun_restored"} <= set(losses)
    _check_backward(model, losses)
    model.noun_pool_temp = 0.0  # max over the groups
    _check_backward(model, model(inputs))


def test_soft_assignment_inference(base_model):
    model = copy.deepcopy(base_model).eval()
    inputs = _inputs(1)
    inputs[0]["vocabulary"] = VOCAB
    with torch.no_grad():
        hard = model(inputs)[0]["sem_seg"]
        model.soft_inference = True
        soft = model(inputs)[0]["sem_seg"]
    assert soft.shape == hard.shape and torch.isfinite(soft).all()
    assert (soft >= 0).all() and (soft <= 1 + 1e-5).all()


def test_batch_of_one_has_no_partner(base_model):
    model = copy.deepcopy(base_model).train()
    losses = model(_inputs(1))
    assert losses["loss_seg"].item() == pytest.approx(0.0, abs=1e-6)
    _check_backward(model, losses)


def test_identical_images_give_finite_losses(base_model):
    model = copy.deepcopy(base_model).train()
    losses = model(_inputs(4, same=True))
    # identical captions: the sources cannot be told apart, P(i, source) = 1/2 exactly
    assert losses["loss_seg"].item() == pytest.approx(math.log(2), rel=1e-4)
    assert all(torch.isfinite(v) for v in losses.values())
    _check_backward(model, losses)


def test_unmixed_model_has_only_the_contrastive_loss():
    model = _model("MODEL.MIXREORG.MIXING", "False").train()
    losses = model(_inputs(3))
    assert set(losses) == {"loss_orig"}
    _check_backward(model, losses)


def test_restored_branch_equals_original_without_progressive_layers():
    """With no block between mixing and restoration, restoring returns the original tokens exactly,
    so the restored branch (given the original group tokens) reproduces the original branch."""
    model = _model(
        "MODEL.MIXREORG.CONTEXT_DEPTH", "2",
        "MODEL.MIXREORG.RESTORE_GROUP_TOKENS", "original",
    ).eval()  # fmt: skip
    assert model.encoder.num_progressive_blocks == 0
    images = model.preprocess_images(_inputs(5)).tensor
    plan = make_mix_plan(5, (8, 8), num_mix=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = model.branch_outputs(images, plan)
    assert torch.allclose(outs["restored"]["segments"], outs["orig"]["segments"], atol=1e-5)
    assert not torch.allclose(outs["mixed"]["segments"], outs["orig"]["segments"], atol=1e-3)


def test_inference_sem_seg_and_background(base_model):
    model = copy.deepcopy(base_model).eval()
    inputs = _inputs(2)
    inputs[0]["vocabulary"] = VOCAB
    inputs[1]["vocabulary"] = ["background", *VOCAB]
    inputs[1]["height"], inputs[1]["width"] = 80, 96  # resized back to the original size
    with torch.no_grad():
        out = model(inputs)
    sem0, sem1 = out[0]["sem_seg"], out[1]["sem_seg"]
    assert sem0.shape == (4, 64, 64) and sem1.shape == (5, 80, 96)
    assert torch.isfinite(sem0).all() and (sem0 >= 0).all() and (sem0 <= 1).all()
    # GroupViT's rule: the background channel is the constant min(BG_THRESH, max class score)
    bg = sem1[0]
    assert torch.allclose(bg, bg.flatten()[0].expand_as(bg))
    assert bg.flatten()[0] <= min(model.bg_thresh, sem1[1:].max().item()) + 1e-6


def test_sliding_window_inference():
    model = _model(
        "MODEL.MIXREORG.TEST.SLIDE_WINDOW", "64", "MODEL.MIXREORG.TEST.SLIDE_STRIDE", "32"
    )
    model.eval()
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "vocabulary": VOCAB, "height": 96, "width": 128}])
    assert out[0]["sem_seg"].shape == (4, 96, 128)
    assert torch.isfinite(out[0]["sem_seg"]).all()


class _Infer(torch.nn.Module):
    def __init__(self, model, class_embeds):
        super().__init__()
        self.model, self.class_embeds = model, class_embeds

    def forward(self, image):
        return self.model.segment_scores(image, self.class_embeds)


def _flops(model, image, class_embeds):
    analysis = FlopCountAnalysis(_Infer(model, class_embeds).eval(), (image,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def test_inference_flops_equal_unmixed_model(base_model):
    """Mixing is training-only: the mixed model's inference costs exactly the unmixed model's."""
    mixed = copy.deepcopy(base_model).eval()
    unmixed = _model("MODEL.MIXREORG.MIXING", "False").eval()
    image = mixed.preprocess_images(_inputs(1)).tensor[0]
    embeds = mixed.class_embeddings(VOCAB)
    f_mixed, f_unmixed = _flops(mixed, image, embeds), _flops(unmixed, image, embeds)
    assert f_mixed > 0 and f_mixed == f_unmixed
    # ... while training runs the progressive layers twice and the neck three times
    train_flops = FlopCountAnalysis(_Branches(mixed), (image[None].expand(2, -1, -1, -1),))
    train_flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert train_flops.total() > 2 * f_mixed


class _Branches(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        plan = make_mix_plan(images.shape[0], (8, 8), num_mix=2)
        outs = self.model.branch_outputs(images, plan)
        return tuple(o["segments"] for o in outs.values())


def test_bad_inputs(base_model):
    model = copy.deepcopy(base_model).train()
    inputs = _inputs(2)
    del inputs[1]["captions"]
    with pytest.raises(ValueError, match="captions"):
        model(inputs)
    model.eval()
    model.default_vocabulary = []
    with pytest.raises(ValueError, match="vocabulary"):
        model(_inputs(1))
    with pytest.raises(ValueError, match="DEPTHS"):
        _model("MODEL.MIXREORG.DEPTHS", "[2, 1]")
    with pytest.raises(ValueError, match="blocks"):
        _model("MODEL.MIXREORG.DEPTHS", "[4, 1, 0]")


def test_train_net_then_eval(toyworld_root, tmp_path):
    out = tmp_path / "run"
    cfg_file = str(REPO / "configs/toyworld/mixreorg.yaml")
    common = [*TINY, "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "4", "RUNTIME.LOG_PERIOD", "1"]
    train = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()"]
    run_train_net(["--config-file", cfg_file, *common, *train])
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    assert any("loss_seg" in m and "loss_rest" in m for m in metrics)
    weights = str(out / "model_final.pth")
    results = run_train_net(
        ["--config-file", cfg_file, "--eval-only", *common, "MODEL.WEIGHTS", weights]
    )
    assert_sem_seg_consistent(results["sem_seg"], "toyworld_sem_seg_val")


def test_config_builds_through_trainer():
    cfg = setup_config("configs/toyworld/mixreorg.yaml", TINY)
    model = Trainer.build_model(cfg)
    assert isinstance(model, MixReorg)
    assert model.encoder.num_segments == 4


@pytest.mark.parametrize("aligned", [True, False])
def test_aligned_init_segments_are_token_means(aligned):
    """ALIGNED_INIT: a new grouping block outputs (nearly) the mean of the tokens each segment
    took, so a pre-trained trunk's features pass through it; a random block does not."""
    from ov_seg.modeling.heads.mixreorg_encoder import GroupingBlock

    torch.manual_seed(0)
    block = GroupingBlock(
        dim=32,
        num_group_tokens=8,
        num_output_groups=4,
        num_heads=4,
        gumbel=False,
        aligned_init=aligned,
    ).eval()
    x = torch.randn(2, 20, 32) * 3 + 1
    groups = torch.randn(2, 8, 32) * 0.02
    with torch.no_grad():
        seg, soft = block(x, groups)
    one_hot = torch.zeros_like(soft).scatter_(2, soft.argmax(2, keepdim=True), 1.0)  # (B, N, G)
    weights = one_hot.transpose(1, 2) / (one_hot.sum(1)[..., None] + 1.0)
    expected = weights @ block.norm_x(x)
    err = ((seg - expected).norm() / expected.norm()).item()
    assert (err < 0.1) if aligned else (err > 0.5)
