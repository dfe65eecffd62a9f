"""Fast inference of the two-stage model (issue 12): the exact speed-ups equal the plain paths, and
each opt-in fast mode keeps the output contract. Tiny random models only."""

import copy

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from helpers import setup_config
from open_clip.transformer import VisionTransformer
from torch import nn

from ov_seg.data import build_dataset_mapper
from ov_seg.modeling.clip import (
    MaskPromptVisionEncoder,
    TextClassifier,
    build_clip,
    normalize_clip,
    prepare_masked_crops,
)
from ov_seg.modeling.clip.quantize import LinearSelfAttention, quantize_vision_linears
from ov_seg.modeling.clip.single_pass import SinglePassMaskEmbedder
from ov_seg.modeling.clip.text_cache import TextEmbeddingCache, text_tower_hash
from ov_seg.modeling.clip.text_classifier import encode_tokens, token_lengths
from ov_seg.modeling.heads.proposal_selection import (
    duplicate_representatives,
    largest_masks,
    mask_iou,
    objectness_keep,
)
from ov_seg.modeling.proposal_sources import Proposals

CONFIG = "configs/toyworld/two_stage_R18.yaml"
TINY = ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]
NAMES = ["red star", "blue circle", "grass", "a much longer class name with many words!", "sky"]


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return build_clip("ovseg-tiny-vit8-64", None)


def _blobs(q, h, w, gen):
    yy = torch.arange(h).float().view(1, -1, 1)
    xx = torch.arange(w).float().view(1, 1, -1)
    c = torch.rand(q, 2, generator=gen) * torch.tensor([w, h])
    r = (0.05 + 0.3 * torch.rand(q, 2, generator=gen)) * max(h, w)
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
        (yy - c[:, 1, None, None]) / r[:, 1, None, None]
    ) ** 2
    return torch.sigmoid(4 * (1 - d))


# ---------------------------------------------------------------- text
def test_short_context_equals_full_context(clip_model):
    tc = TextClassifier(clip_model, templates="vild")
    prompts = [t.format(n) for n in NAMES for t in tc.templates]
    tokens = tc.tokenizer(prompts)
    assert int(token_lengths(tokens).max()) < tokens.shape[1]  # the test trims something
    with torch.no_grad():
        full = clip_model.encode_text(tokens)
        short = encode_tokens(clip_model, tokens)
        reference = encode_tokens(clip_model, tokens, trim=False)
    assert torch.equal(reference, full)
    assert (short - full).abs().max() < 1e-5
    # the classifier (length-sorted batches, trimmed) equals the plain one (one batch, context 77)
    plain = TextClassifier(clip_model, templates="vild", trim_context=False, batch_size=10**6)
    fast = TextClassifier(clip_model, templates="vild", batch_size=16)
    assert (fast.class_embeddings(NAMES) - plain.class_embeddings(NAMES)).abs().max() < 1e-5


def test_token_zero_and_non_causal_towers(clip_model):
    # "!" is BPE id 0, like the padding: the used length still ends at the end token
    tc = TextClassifier(clip_model, templates="single")
    tokens = tc.tokenizer(["!", "a photo of a !!"])
    assert (tokens == 0).any(dim=1).all()
    lengths = token_lengths(tokens)
    assert lengths.tolist() == [int((t == t.max()).nonzero()[0]) + 1 for t in tokens]
    # without a causal mask, trimming would change the output: falls back to the full context
    other = copy.deepcopy(clip_model)
    other.attn_mask = torch.zeros_like(other.attn_mask)
    with torch.no_grad():
        assert torch.equal(encode_tokens(other, tokens), other.encode_text(tokens))


def test_disk_cache_hit_equals_miss(clip_model, tmp_path):
    tc = TextClassifier(clip_model, templates="vild", cache_dir=str(tmp_path))
    miss = tc.class_embeddings(NAMES)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))  # atomic write, no leftovers
    assert files[0].parent.name == text_tower_hash(clip_model)
    calls = []
    fresh = TextClassifier(clip_model, templates="vild", cache_dir=str(tmp_path))
    fresh.encode_texts = lambda texts: calls.append(texts)  # a hit must not encode
    hit = fresh.class_embeddings(NAMES)
    assert not calls and torch.equal(hit, miss)
    # keyed by templates, names (and their order) and weights
    cache = TextEmbeddingCache(str(tmp_path))
    h = text_tower_hash(clip_model)
    assert cache.load(h, tc.templates, NAMES[::-1]) is None
    assert cache.load(h, ("a {}",), NAMES) is None
    other = copy.deepcopy(clip_model)
    with torch.no_grad():
        other.ln_final.weight.add_(1.0)
    assert text_tower_hash(other) != h
    files[0].write_bytes(b"corrupt")  # a corrupt file is a miss
    assert cache.load(h, tc.templates, NAMES) is None


def test_shared_text_cache_encodes_once(clip_model):
    a = TextClassifier(clip_model, templates="single")
    b = TextClassifier(clip_model, templates="single", void=True)
    assert b.share_cache(a)
    assert not TextClassifier(clip_model, templates="vild").share_cache(a)
    first = a(NAMES)
    b.encode_texts = lambda texts: pytest.fail("shared cache: nothing to encode")
    b.encode_prompts = lambda names: pytest.fail("shared cache: nothing to encode")
    out = b(NAMES)
    assert out.shape == (len(NAMES) + 1, first.shape[1]) and torch.equal(out[:-1], first)


# ---------------------------------------------------------------- crops
@pytest.mark.parametrize("square", [False, True])
def test_separable_crops_equal_roi_align(square):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 40, 56, generator=gen) * 255
    masks = _blobs(12, 40, 56, gen)
    masks[5] = masks[4]  # a duplicate box (the image is resampled once for both)
    masks[7] = 0.9  # the whole image
    masks[8] = 0.0  # empty
    kw = dict(mask_thr=0.5, expand_ratio=1.2, out_size=24, square=square)
    ref = prepare_masked_crops(image, masks, resampler="roi_align", **kw)
    out = prepare_masked_crops(image, masks, resampler="separable", **kw)
    assert torch.equal(out.valid, ref.valid) and torch.equal(out.boxes, ref.boxes)
    flipped = out.masks != ref.masks  # only exact ties at the 0.5 threshold may differ
    assert flipped.float().mean() < 1e-3
    same = (~flipped).unsqueeze(1).expand_as(out.images)
    assert (out.images - ref.images).abs()[same].max() < 1e-5


# ---------------------------------------------------------------- proposal selection
def test_proposal_selection():
    masks = torch.zeros(5, 8, 8)
    masks[0, :4] = 0.9
    masks[1, :4] = 0.8  # identical to 0 after binarisation
    masks[2, :4, :7] = 0.9  # IoU 7/8 with 0
    masks[3, 5:] = 0.9
    scores = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.3])  # mask 4 is empty
    unique, inverse = duplicate_representatives(masks, scores, 0.5, 1.0)
    assert unique[inverse].tolist() == [1, 1, 2, 3, 4]  # the higher score represents
    unique, inverse = duplicate_representatives(masks, scores, 0.5, 0.8)
    assert unique[inverse].tolist() == [1, 1, 1, 3, 4]
    unique, inverse = duplicate_representatives(masks, scores, 0.5, 1.01)
    assert unique[inverse].tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(mask_iou(masks > 0.5)[0, 2], torch.tensor(7 / 8))
    assert objectness_keep(scores, 0.3).tolist() == [False, True, True, False, True]
    assert objectness_keep(scores, 0.95).tolist() == [False, True, False, False, False]
    assert largest_masks(masks, 0.5, 2).tolist() == [True, True, False, False, False]  # ties: first
    assert largest_masks(masks, 0.5, 9).all() and not largest_masks(masks, 0.5, 0).any()


def test_identical_mask_groups_equal_brute_force():
    """IoU 1.0 on the CPU (packed-bit dictionary) groups exactly the identical binarised masks."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 17, 23, generator=g)
    masks[[4, 9, 21]] = masks[2].clone()  # planted duplicates
    masks[12] = masks[7] * 0.9 + 0.05  # other probabilities, (almost surely) the same binary mask
    masks[[5, 6]] = 0.0  # two empty masks
    scores = torch.rand(30, generator=g)
    binary = masks > 0.5
    unique, inverse = duplicate_representatives(masks, scores, 0.5, 1.0)
    rep = unique[inverse]
    for i in range(30):
        same = [j for j in range(30) if torch.equal(binary[i], binary[j])]
        assert rep[i] == max(same, key=lambda j: scores[j])  # the best-scoring identical mask
    assert rep[9] == rep[2] and rep[6] == rep[5] and rep[12] == rep[7]
    assert torch.equal(unique, unique.sort().values)


# ---------------------------------------------------------------- image tower modes
def test_linear_attention_and_int8(clip_model):
    visual = copy.deepcopy(clip_model.visual)
    ref_enc = MaskPromptVisionEncoder(clip_model.visual, 0, register_visual=False)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_enc(images).embedding
        block = visual.transformer.resblocks[0]
        attn = LinearSelfAttention(block.attn)
        x = torch.randn(2, 9, 64)
        mask = torch.zeros(9, 9).masked_fill_(torch.ones(9, 9, dtype=torch.bool).triu(1), -1e9)
        for m in (None, mask):
            expected = block.attn(x, x, x, need_weights=False, attn_mask=m)[0]
            assert (attn(x, x, x, attn_mask=m)[0] - expected).abs().max() < 1e-5
        quantize_vision_linears(visual)
        out = MaskPromptVisionEncoder(visual, 0, register_visual=False)(images).embedding
    assert isinstance(visual.transformer.resblocks[0].attn, LinearSelfAttention)
    assert out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert (cos > 0.98).all()


@pytest.mark.parametrize("pool_type", ["avg", "tok"])
@pytest.mark.parametrize("pooling", ["attention", "region", "mean"])
def test_single_pass_embeddings(clip_model, pooling, pool_type):
    visual = clip_model.visual
    if pool_type == "tok":  # a class-token tower (OpenAI's kind); the tiny configs average-pool
        torch.manual_seed(0)
        visual = VisionTransformer(64, 8, 32, 2, 2, 2.0, output_dim=24, pool_type="tok").eval()
    assert visual.pool_type == pool_type
    embedder = SinglePassMaskEmbedder(visual, pooling, layers=2)
    gen = torch.Generator().manual_seed(0)
    image = normalize_clip(torch.rand(3, 48, 72, generator=gen) * 255)
    masks = _blobs(4, 48, 72, gen) > 0.5
    masks[3] = False
    masks[3, 2, 2] = True  # smaller than a patch: its patch is used
    assert embedder.input_size((48, 72)) == (64, 96)
    with torch.no_grad():
        out = embedder(image, masks)
        alone = embedder(image, masks[:1])
    assert out.shape == (4, visual.output_dim) and torch.isfinite(out).all()
    # masks do not see each other: the first embedding is the same alone
    assert (out[0] - alone[0]).abs().max() < 1e-5


# ---------------------------------------------------------------- two-stage model
class _DuplicatingSource(nn.Module):
    """Wraps a proposal source: proposal q + Q/2 gets the mask of proposal q (exact duplicates)."""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.has_class_scores = source.has_class_scores

    def forward(self, batched_inputs, vocabulary):
        out = []
        for p in self.source(batched_inputs, vocabulary):
            half = p.masks.shape[0] // 2
            masks = p.masks.clone()
            masks[half : 2 * half] = p.masks[:half]
            out.append(Proposals(masks, p.scores, p.class_probs))
        return out


def _cfg(*opts):
    return setup_config(CONFIG, [*TINY, *opts])


@pytest.fixture(scope="module")
def model(toyworld_root):
    torch.manual_seed(0)
    m = build_model(_cfg("MODEL.TWO_STAGE.TEST.PANOPTIC_ON", "True")).eval()
    m.proposal_source = _DuplicatingSource(m.proposal_source)
    return m


@pytest.fixture(scope="module")
def inputs(toyworld_root):
    cfg = _cfg()
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name="toyworld_sem_seg_val")
    return [mapper(d) for d in DatasetCatalog.get("toyworld_sem_seg_val")[:2]]


def _check_contract(out, reference, inputs):
    assert len(out) == len(reference) == len(inputs)
    for r, e, x in zip(out, reference, inputs):
        assert set(r) == set(e) == {"sem_seg", "panoptic_seg", "vocabulary"}
        assert r["vocabulary"] == e["vocabulary"]
        assert r["sem_seg"].shape == e["sem_seg"].shape == (69, x["height"], x["width"])
        assert r["sem_seg"].dtype == e["sem_seg"].dtype and torch.isfinite(r["sem_seg"]).all()
        pan, segments = r["panoptic_seg"]
        assert pan.shape == e["panoptic_seg"][0].shape and pan.dtype == torch.int32
        assert set(pan.unique().tolist()) <= {s["id"] for s in segments} | {0}


def test_model_shares_the_text_cache(model):
    head = model.proposal_source.source.model.class_head.text_classifier
    assert head._name_cache is model.crop_classifier.text_classifier._name_cache


def test_exact_duplicate_sharing_equals_plain(model, inputs):
    calls = []
    original = model.crop_classifier.encode_crops

    def counting(crops, masks):
        calls.append(crops.shape[0])
        return original(crops, masks)

    model.crop_classifier.encode_crops = counting
    try:
        plain_iou, model.duplicate_iou = model.duplicate_iou, 1.01
        plain = model(inputs)
        model.duplicate_iou = plain_iou
        shared = model(inputs)
    finally:
        del model.crop_classifier.encode_crops
    assert sum(calls[len(calls) // 2 :]) < sum(calls[: len(calls) // 2])  # fewer crops
    for a, b in zip(shared, plain):
        assert (a["sem_seg"] - b["sem_seg"]).abs().max() < 1e-5
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])


def test_fast_modes_keep_the_output_contract(model, inputs):
    reference = model(inputs)
    saved = (model.min_objectness, model.duplicate_iou, model.clip_mode, model.single_pass)
    try:
        model.min_objectness = 0.99  # skips almost everything (the best proposal stays)
        _check_contract(model(inputs), reference, inputs)
        model.min_objectness, model.duplicate_iou = 0.0, 0.5
        _check_contract(model(inputs), reference, inputs)
        size, model.crop_classifier.crop_size = model.crop_classifier.crop_size, 32
        try:
            _check_contract(model(inputs), reference, inputs)
        finally:
            model.crop_classifier.crop_size = size
        for pooling in ("attention", "region", "mean"):
            model.clip_mode = "single_pass"
            model.single_pass = SinglePassMaskEmbedder(model.crop_classifier.clip.visual, pooling)
            _check_contract(model(inputs), reference, inputs)
    finally:
        model.min_objectness, model.duplicate_iou, model.clip_mode, model.single_pass = saved


def test_full_size_crops_for_the_largest_masks(model, inputs):
    """FULL_SIZE_CROPS K: the K largest masks of an image get native-size crops, the others the
    smaller CROP_SIZE; each embedding equals the one of its size's uniform mode."""
    images = model.rgb_images(inputs)
    proposals = model.generate_proposals(inputs, list(model.default_vocabulary))
    masks = [p.masks for p in proposals]
    classifier = model.crop_classifier
    saved = (classifier.crop_size, model.full_size_crops)
    try:
        with torch.inference_mode():
            full, full_valid = model.clip_embeddings(images, masks)
            classifier.crop_size = 32
            small, small_valid = model.clip_embeddings(images, masks)
            model.full_size_crops = 2
            mixed, mixed_valid = model.clip_embeddings(images, masks)
            model.full_size_crops = 1000  # every mask is among the largest: no small crop at all
            every, _ = model.clip_embeddings(images, masks)
    finally:
        classifier.crop_size, model.full_size_crops = saved
    large = [largest_masks(m, classifier.mask_thr, 2) for m in masks]
    for flags in (small_valid, mixed_valid):
        assert all(torch.equal(a, b) for a, b in zip(flags, full_valid))
    assert mixed.shape == full.shape and not torch.allclose(full, small, atol=1e-4)
    is_large = torch.cat([g[v] for g, v in zip(large, full_valid)])  # per valid mask, in order
    assert 0 < int(is_large.sum()) < is_large.numel()
    assert torch.allclose(mixed[is_large], full[is_large], atol=1e-5)
    assert torch.allclose(mixed[~is_large], small[~is_large], atol=1e-5)
    assert torch.allclose(every, full, atol=1e-5)


def test_channels_last_proposals_match_the_default_layout(model, inputs):
    reference = model(inputs)
    convs = [m for m in model.proposal_source.modules() if isinstance(m, torch.nn.Conv2d)]
    model.channels_last, model._fast_prepared = True, False
    try:
        fast = model(inputs)
        assert convs and all(
            m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
        )
    finally:
        model.channels_last = False
        for m in convs:
            m.to(memory_format=torch.contiguous_format)
    for a, b in zip(fast, reference):  # only float rounding differs
        assert (a["sem_seg"] - b["sem_seg"]).abs().max() < 1e-4


def test_fast_config_keys_build_a_working_model(toyworld_root, inputs, tmp_path):
    cfg = _cfg(
        "MODEL.TWO_STAGE.TEST.PANOPTIC_ON", "True",
        "MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS", "0.1",
        "MODEL.TWO_STAGE.FAST.DUPLICATE_IOU", "0.9",
        "MODEL.TWO_STAGE.FAST.CLIP_MODE", "single_pass",
        "MODEL.TWO_STAGE.FAST.SINGLE_PASS_POOLING", "mean",
        "MODEL.TWO_STAGE.FAST.SINGLE_PASS_SIZE", "48",
        "MODEL.TWO_STAGE.FAST.QUANTIZE", "int8_dynamic",
        "MODEL.TWO_STAGE.FAST.CROP_SIZE", "32",
        "MODEL.TWO_STAGE.FAST.CHANNELS_LAST", "True",
        "MODEL.CLIP.TEXT_CACHE_DIR", str(tmp_path),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.single_pass.pooling == "mean" and model.single_pass.size == 48
    assert model.crop_classifier.crop_size == 32
    reference = [
        {"sem_seg": torch.zeros(69, x["height"], x["width"]), "panoptic_seg": (
            torch.zeros(x["height"], x["width"], dtype=torch.int32), []), "vocabulary": None}
        for x in inputs
    ]  # fmt: skip
    out = model(inputs)
    for r, e in zip(reference, out):
        r["vocabulary"] = e["vocabulary"]
    _check_contract(out, reference, inputs)
    assert model._fast_prepared and list(tmp_path.rglob("*.pt"))
    convs = [m.weight for m in model.proposal_source.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    visual_conv = model.crop_classifier.clip.visual.conv1.weight  # the CLIP is left alone
    assert visual_conv.is_contiguous() and not visual_conv.is_contiguous(
        memory_format=torch.channels_last
    )
    with pytest.raises(KeyError, match="CLIP_MODE"):
        build_model(_cfg("MODEL.TWO_STAGE.FAST.CLIP_MODE", "nope"))


def test_auto_crop_batch_size_follows_the_tower_and_keeps_outputs():
    """CROP_BATCH_SIZE 0: a few large crops per forward on a CPU, many small ones; the embeddings
    do not depend on the batch size."""
    from ov_seg.engine.setup import get_ov_seg_cfg
    from ov_seg.modeling.clip import MaskedCropClassifier
    from ov_seg.modeling.clip.crop_classifier import CPU_ACTIVATION_BUDGET

    cfg = get_ov_seg_cfg()
    cfg.MODEL.CLIP.MODEL_NAME = "ovseg-tiny-vit8-64"
    cfg.MODEL.CLIP.PRETRAINED = ""
    torch.manual_seed(0)
    clf = MaskedCropClassifier(cfg).eval()
    assert clf.batch_size == 0
    crops = torch.randn(40, 3, 64, 64)
    tokens, hidden = (64 // 8) ** 2 + 1, clf.encoder.visual.transformer.resblocks[0].mlp.c_fc
    expected = CPU_ACTIVATION_BUDGET // (tokens * hidden.out_features * 4)
    assert clf.crop_batch_size(crops) == expected
    assert clf.crop_batch_size(torch.randn(2, 3, 128, 128)) < expected  # more tokens, fewer crops
    with torch.no_grad():
        auto = clf.encode_crops(crops, None)
        clf.batch_size = 3
        assert clf.crop_batch_size(crops) == 3
        assert torch.allclose(clf.encode_crops(crops, None), auto, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_class_token_only_last_block_equals_the_full_tower(depth):
    """need_tokens=False: a class-token tower runs its last block for the class token alone; the
    embedding equals the full forward's (with and without mask prompts, training graph too). An
    average-pooling tower, or a quantized copy, ignores the shortcut."""
    torch.manual_seed(0)
    visual = VisionTransformer(64, 8, 32, 2, 2, 2.0, output_dim=24, pool_type="tok").eval()
    encoder = MaskPromptVisionEncoder(visual, depth=depth)
    assert encoder.class_token_only()
    gen = torch.Generator().manual_seed(1)
    crops = torch.randn(5, 3, 64, 64, generator=gen)
    masks = _blobs(5, 64, 64, gen) > 0.5
    with torch.no_grad():
        full = encoder(crops, masks)
        short = encoder(crops, masks, need_tokens=False)
    assert short.tokens is None and full.tokens.shape == (5, 64, 32)
    assert torch.allclose(short.embedding, full.embedding, atol=1e-5)
    # gradients reach the weights the same way
    encoder(crops, masks, need_tokens=False).embedding.sum().backward()
    grad_short = visual.conv1.weight.grad.clone()
    visual.zero_grad()
    encoder(crops, masks).embedding.sum().backward()
    assert torch.allclose(grad_short, visual.conv1.weight.grad, atol=1e-4)

    avg = MaskPromptVisionEncoder(
        VisionTransformer(64, 8, 32, 2, 2, 2.0, output_dim=24, pool_type="avg").eval(), depth
    )
    assert not avg.class_token_only()
    # average pooling needs every token: they are computed (and returned) anyway
    assert avg(crops, masks, need_tokens=False).tokens.shape == (5, 64, 32)
    quantized = copy.deepcopy(visual)
    quantize_vision_linears(quantized)
    assert not MaskPromptVisionEncoder(quantized, depth=depth).class_token_only()
