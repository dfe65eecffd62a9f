"""ProposalMaskFormer end to end on random inputs: training, odd / mixed sizes, bad input."""

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import BitMasks, Instances
from helpers import setup_config

from ov_seg.engine import Trainer
from ov_seg.modeling.meta_arch.proposal_maskformer import ProposalMaskFormer

CONFIG = "configs/toyworld/proposal_R18.yaml"
# smaller than the toy config: 2 decoder layers, 8 queries
TINY = ["MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8"]


def _model(opts=()):
    torch.manual_seed(0)
    return Trainer.build_model(setup_config(CONFIG, [*TINY, *opts]))


def _input(h, w, num_segments=2, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    masks = torch.zeros(num_segments, h, w, dtype=torch.bool)
    for i in range(num_segments):
        masks[i, i * h // (num_segments + 1) :, : (i + 1) * w // (num_segments + 1) + 1] = True
    inst = Instances((h, w))
    inst.gt_classes = torch.arange(num_segments, dtype=torch.int64) + 5
    inst.gt_masks = BitMasks(masks)
    return {"image": image, "instances": inst, **extra}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 64-px images: one torch thread (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return _model()


def _train_step(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses


def test_train_step_finite_losses_and_gradients(model):
    losses = _train_step(model, [_input(64, 64, 3), _input(64, 64, 0, seed=1)])
    # deep supervision: final + one auxiliary layer
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"} == set(
        losses
    )
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "opts",
    [
        [
            "MODEL.PIXEL_DECODER.NAME",
            "TransformerEncoderPixelDecoder",
            "MODEL.PIXEL_DECODER.TRANSFORMER_ENC_LAYERS",
            "1",
            "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE",
            "transformer_encoder",
        ],
        ["MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64", "MODEL.MASK_FORMER.DEEP_SUPERVISION", "False"],
        [
            "MODEL.MASK_FORMER.MASK_LOSS_AT_TARGET_SIZE",
            "True",
            "MODEL.MASK_FORMER.PRE_NORM",
            "True",
        ],
    ],
    ids=["transformer_encoder", "point_sampled", "dense_prenorm"],
)
def test_variants_train(opts):
    model = _model(opts)
    losses = _train_step(model, [_input(48, 40, 2), _input(64, 64, 1, seed=2)])
    if "DEEP_SUPERVISION" in opts:
        assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _convs(model):
    return [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_same_model_and_numbers():
    """MASK_FORMER.CHANNELS_LAST: the same parameters and checkpoints; losses, gradients and
    proposals equal to the default layout's up to float rounding."""
    model = _model(["MODEL.MASK_FORMER.CHANNELS_LAST", "False"])
    fast = _model(["MODEL.MASK_FORMER.CHANNELS_LAST", "True"])
    assert _convs(model) and all(m.weight.is_contiguous() for m in _convs(model))
    fast.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    channels_last = torch.channels_last
    assert all(m.weight.is_contiguous(memory_format=channels_last) for m in _convs(fast))
    batch = [_input(64, 64, 3), _input(48, 40, 1, seed=4)]
    ref, got = _train_step(model, batch), _train_step(fast, batch)
    assert set(ref) == set(got)
    for name in ref:
        assert torch.allclose(ref[name], got[name], rtol=1e-4, atol=1e-5), name
    grads = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None:  # relative error of the whole gradient: float rounding only
            ref_grad = grads[name].grad
            err = (p.grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12)
            assert err < 1e-3, (name, float(err))
    model.eval()
    fast.eval()
    with torch.no_grad():
        a, b = model(batch[:1])[0]["proposals"], fast(batch[:1])[0]["proposals"]
    assert torch.allclose(a["masks"], b["masks"], atol=1e-4)
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def _check_proposals(r, q, h, w):
    props = r["proposals"]
    assert props["masks"].shape == (q, h, w)
    assert props["scores"].shape == (q,) and props["class_logits"].shape == (q, 2)
    assert props["query_embeds"].shape[0] == q
    assert 0 <= props["masks"].min() and props["masks"].max() <= 1
    assert 0 <= props["scores"].min() and props["scores"].max() <= 1


def test_eval_odd_and_mixed_sizes(model):
    model.eval()
    batch = [
        {"image": torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)},
        {
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
            "height": 97,
            "width": 101,
        },
        {"image": torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8)},  # < size divisibility
    ]
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 3
    _check_proposals(results[0], 8, 37, 53)
    _check_proposals(results[1], 8, 97, 101)
    _check_proposals(results[2], 8, 7, 5)
    assert set(results[0]) == {"proposals"}  # class-agnostic: proposals only
    # predict_proposals gives the same proposals, one image at a time or batched
    single = model.predict_proposals(batch[:1])[0]
    assert torch.allclose(single["masks"], results[0]["proposals"]["masks"], atol=1e-4)
    assert torch.allclose(single["scores"], results[0]["proposals"]["scores"], atol=1e-5)


def test_train_on_tiny_image_and_empty_targets(model):
    # image smaller than the size divisibility, and a batch whose images have no segment at all
    _train_step(model, [_input(9, 11, 1)])
    losses = _train_step(model, [_input(20, 30, 0), _input(16, 16, 0, seed=3)])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0


def test_semantic_and_panoptic_inference(model):
    # hand-built: 3 classes (0, 1 stuff; 2 thing) + no object, 4 queries on a 4x4 image
    mask_cls = torch.full((4, 4), -10.0)
    mask_cls[0, 0] = mask_cls[1, 0] = mask_cls[2, 2] = (
        10.0  # two queries of stuff class 0, one thing
    )
    mask_cls[3, 3] = 10.0  # no object
    masks = torch.zeros(4, 4, 4)
    masks[0, :2] = 1  # stuff 0, top half
    masks[1, 2:, :2] = 1  # stuff 0 again, bottom left
    masks[2, 2:, 2:] = 1  # thing, bottom right
    masks[3] = 1
    sem = ProposalMaskFormer.semantic_inference(mask_cls, masks)
    assert sem.shape == (3, 4, 4)
    assert sem.argmax(0)[0, 0] == 0 and sem.argmax(0)[3, 3] == 2
    model.thing_ids = {2}
    pan, info = model.panoptic_inference(mask_cls, masks)
    assert pan.shape == (4, 4)
    assert sorted((s["category_id"], s["isthing"]) for s in info) == [(0, False), (2, True)]
    stuff_id = next(s["id"] for s in info if not s["isthing"])
    assert (pan[:2] == stuff_id).all() and (pan[2:, :2] == stuff_id).all()  # merged stuff
    assert (pan[2:, 2:] != stuff_id).all() and (pan[2:, 2:] > 0).all()
    # nothing above the threshold: empty segmentation
    pan, info = model.panoptic_inference(torch.zeros(4, 4), masks)
    assert info == [] and (pan == 0).all()


def test_bad_input(model):
    model.eval()
    with pytest.raises(ValueError, match="3, H, W"):
        model([{"image": torch.zeros(1, 8, 8, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match="empty batch"):
        model([])
    model.train()
    with pytest.raises(KeyError, match="instances"):
        model([{"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match="class-agnostic"):
        _model(["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True"])
    with pytest.raises(KeyError, match="TRANSFORMER_IN_FEATURE"):
        _model(["MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5"])


OPEN_VOCAB = [
    "MODEL.MASK_FORMER.CLASS_HEAD.NAME",
    "open_vocab",
    "MODEL.MASK_FORMER.CLASS_HEAD.EMBED_HIDDEN_DIM",
    "32",
    "MODEL.CLIP.MODEL_NAME",
    "ovseg-tiny-vit8-64",
    "MODEL.CLIP.PRETRAINED",
    "",
    "MODEL.CLIP.TEMPLATES",
    "toyworld",
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON",
    "True",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON",
    "True",
    "DATASETS.TRAIN",
    "('toyworld_panoptic_train',)",
    "DATASETS.TEST",
    "('toyworld_panoptic_val',)",
]


def test_open_vocab_head_train_and_inference():
    model = _model(OPEN_VOCAB)
    vocab = ["red circle", "blue square", "grass", "sky", "green star", "white ring", "black heart"]
    losses = _train_step(
        model, [_input(64, 64, 2, vocabulary=vocab), _input(48, 64, 1, seed=4, vocabulary=vocab)]
    )
    head = model.class_head
    assert head.text_classifier.void_embedding.grad is not None  # the no-object embedding trains
    # the CLIP is referenced, not owned: frozen, and absent from the model's parameters and
    # checkpoints
    clip_params = {id(p) for p in head.text_classifier.clip_model.parameters()}
    assert not clip_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith("class_head.text_classifier.clip") for k in model.state_dict())
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        logits = model.forward_outputs(torch.zeros(1, 3, 64, 64), vocab)["pred_logits"]
        assert logits.shape[-1] == len(vocab) + 1
        assert logits.abs().max() <= head.logit_scale + 1e-3  # tau * cosine
        other = ["purple cross", "sand"]  # any vocabulary at test time
        r = model(
            [{"image": torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8), "vocabulary": other}]
        )[0]
    assert r["sem_seg"].shape == (2, 40, 56)
    assert r["proposals"]["class_logits"].shape == (8, 3)
    pan, info = r["panoptic_seg"]
    assert pan.shape == (40, 56) and all(s["category_id"] < 2 for s in info)
    # the default vocabulary is the training dataset's class names
    assert model.vocabulary == list(MetadataCatalog.get("toyworld_panoptic_train").stuff_classes)
