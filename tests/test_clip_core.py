"""CLIP core: mask-prompt encoder, masked crops, text classifier, tokenizer, checkpoints."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ov_seg.modeling.clip import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_STD,
    TEMPLATE_SETS,
    MaskedCropClassifier,
    MaskPromptVisionEncoder,
    TextClassifier,
    build_clip,
    build_tokenizer,
    clip_sizes,
    install_compact_vocabulary,
    jitter_masks,
    load_mask_prompts,
    patch_keep_mask,
    prepare_masked_crops,
    prepare_masked_crops_batch,
    save_clip_checkpoint,
)
from ov_seg.modeling.losses.contrastive import contrastive_classification, info_nce

TINY = "ovseg-tiny-vit8-64"


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return build_clip(TINY, None)


def test_sizes_and_constants(clip_model):
    s = clip_sizes(clip_model)
    assert (s.embed_dim, s.vision_width, s.patch_size, s.image_size, s.grid_size) == (
        64,
        64,
        8,
        64,
        8,
    )
    assert CLIP_PIXEL_MEAN == pytest.approx((122.771, 116.746, 104.094), abs=1e-3)
    assert CLIP_PIXEL_STD == pytest.approx((68.501, 66.632, 70.323), abs=1e-3)


# ---------------------------------------------------------------- mask prompt encoder
def test_mask_prompt_encoder_equals_open_clip(clip_model):
    visual = clip_model.visual
    x = torch.randn(3, 3, 64, 64)
    ref = visual(x)
    enc = MaskPromptVisionEncoder(visual, depth=3)
    assert torch.equal(enc(x).embedding, ref)  # no mask
    assert torch.equal(
        enc(x, torch.ones(3, 64, 64, dtype=torch.bool)).embedding, ref
    )  # all-ones mask
    assert torch.equal(enc(x, torch.ones(3, 64, 64)).embedding, ref)  # float all-ones
    partial = torch.zeros(3, 64, 64, dtype=torch.bool)
    partial[:, ::8, ::8] = True  # one pixel in every patch: no patch is fully masked
    assert torch.equal(enc(x, partial).embedding, ref)
    enc0 = MaskPromptVisionEncoder(visual, depth=0)
    assert torch.equal(enc0(x, torch.zeros(3, 64, 64, dtype=torch.bool)).embedding, ref)
    assert enc0.prompts is None
    # the patch tokens are open_clip's (after ln_post, before the projection)
    visual.output_tokens = True
    try:
        _, tokens = visual(x)
    finally:
        visual.output_tokens = False
    out = enc(x)
    assert torch.equal(out.tokens, tokens) and out.grid == (8, 8)


def test_patch_keep_mask_hand_built():
    m = torch.zeros(1, 16, 24, dtype=torch.bool)  # grid 2 x 3, patch 8
    m[0, 0, 0] = True  # patch (0, 0): one pixel
    m[0, 8:16, 16:24] = True  # patch (1, 2): all pixels
    keep = patch_keep_mask(m, (8, 8), (2, 3))
    assert keep.tolist() == [[True, False, False, False, False, True]]


def test_prompts_replace_only_fully_masked_patches(clip_model):
    """Depth 1 = replacement at the input only: check the tokens entering the first block."""
    visual = clip_model.visual
    enc = MaskPromptVisionEncoder(visual, depth=1)
    with torch.no_grad():
        enc.prompts.normal_(0, 5.0)
    x = torch.randn(1, 3, 64, 64)
    mask = torch.ones(1, 64, 64, dtype=torch.bool)
    mask[0, :8, :8] = False  # patch 0 fully masked
    mask[0, 8:16, 8:15] = False  # patch 9: one column still foreground -> kept
    mask[0, 56:, 56:] = False  # patch 63 fully masked
    seen = {}
    handle = visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("x", args[0].detach().clone())
    )
    try:
        enc(x, mask)
        with_prompts = seen["x"]
        enc(x)
        plain = seen["x"]
    finally:
        handle.remove()
    changed = (with_prompts - plain).abs().amax(dim=-1)[0]  # (1 + 64,)
    assert changed[0] == 0  # class token never replaced
    assert set(torch.nonzero(changed[1:])[:, 0].tolist()) == {0, 63}


def test_prompt_depth_controls_blocks(clip_model):
    visual = clip_model.visual
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 16:40, 16:40] = True
    prompts = torch.randn(3, 64, 64)
    outs = [
        MaskPromptVisionEncoder(visual, d, prompts=prompts[:d] if d else None)(x, mask)
        for d in (1, 2, 3)
    ]
    assert not torch.allclose(outs[0].embedding, outs[1].embedding)
    assert not torch.allclose(outs[1].embedding, outs[2].embedding)
    with pytest.raises(ValueError, match="depth"):
        MaskPromptVisionEncoder(visual, depth=4)


def test_other_input_size(clip_model):
    visual = clip_model.visual
    enc = MaskPromptVisionEncoder(visual, depth=2)
    x = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128)
    mask[:, 20:60, 30:90] = 1.0
    out = enc(x, mask)
    assert out.embedding.shape == (2, 64) and out.tokens.shape == (2, 12 * 16, 64)
    assert out.grid == (12, 16)
    assert torch.isfinite(out.embedding).all()


def test_mpt_only_prompts_get_gradients(clip_model):
    enc = MaskPromptVisionEncoder(clip_model.visual, depth=3)
    for p in clip_model.parameters():
        p.requires_grad_(False)
    try:
        x = torch.randn(2, 3, 64, 64)
        mask = torch.zeros(2, 64, 64, dtype=torch.bool)
        mask[:, 10:30, 20:50] = True
        enc(x, mask).embedding.sum().backward()
        assert enc.prompts.grad is not None and enc.prompts.grad.abs().sum() > 0
        assert all(p.grad is None for p in clip_model.parameters())
    finally:
        for p in clip_model.parameters():
            p.requires_grad_(True)


# ---------------------------------------------------------------- masked crops
def _reference_crops(image, masks, thr, ratio, size, square, values=False):
    """Per-mask loop reference: nonzero-based box, roi_align of one box, fill, normalise
    (``values``: also the resampled mask values before the 0.5 threshold)."""
    mean = torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1)
    h, w = image.shape[-2:]
    crops, crop_masks, valid, mask_values = [], [], [], []
    for m in masks:
        b = m > thr
        valid.append(bool(b.any()))
        if not b.any():
            continue
        ys, xs = torch.nonzero(b, as_tuple=True)
        x0, x1 = xs.min().item(), xs.max().item() + 1
        y0, y1 = ys.min().item(), ys.max().item() + 1
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * ratio, (y1 - y0) * ratio
        if square:
            bw = bh = max(bw, bh)
        box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        if not square:
            box = [
                min(max(box[0], 0), w),
                min(max(box[1], 0), h),
                min(max(box[2], 0), w),
                min(max(box[3], 0), h),
            ]
        rois = torch.tensor([[0.0, *box]])
        ci = roi_align(image[None].float(), rois, (size, size), 1.0, -1, True)[0]
        cm = roi_align(b[None, None].float(), rois, (size, size), 1.0, -1, True)[0, 0] >= 0.5
        crops.append(torch.where(cm, (ci - mean) / std, torch.zeros(())))
        crop_masks.append(cm)
        mask_values.append(
            roi_align(b[None, None].float(), rois, (size, size), 1.0, -1, True)[0, 0]
        )
    if values:
        return torch.stack(crops), torch.stack(crop_masks), torch.tensor(valid), mask_values
    return torch.stack(crops), torch.stack(crop_masks), torch.tensor(valid)


@pytest.mark.parametrize("resampler", ["roi_align", "separable"])
@pytest.mark.parametrize("ratio,square", [(1.0, False), (1.3, False), (1.2, True)])
def test_vectorised_crops_equal_reference(ratio, square, resampler):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 48, 80, generator=g) * 255
    masks = torch.zeros(6, 48, 80)
    masks[0, 5:20, 10:40] = 0.9
    masks[1, 30:48, 60:80] = 0.7  # touches the border
    masks[2] = torch.rand(48, 80, generator=g)  # soft noise
    masks[3, 10, 10] = 0.3  # below the threshold: empty
    masks[4, 2:9, 70:73] = 1.0
    masks[5, 20:21, 0:80] = 0.5  # one-row mask
    out = prepare_masked_crops(
        image, masks, 0.4, expand_ratio=ratio, out_size=32, square=square, resampler=resampler
    )
    ref_img, ref_mask, ref_valid, ref_values = _reference_crops(
        image, masks, 0.4, ratio, 32, square, values=True
    )
    assert out.valid.tolist() == ref_valid.tolist() == [True, True, True, False, True, True]
    assert out.images.shape == (5, 3, 32, 32) and out.masks.dtype == torch.bool
    if resampler == "roi_align":
        assert torch.equal(out.masks, ref_mask)
    else:  # batched matmuls round differently: only exact ties at 0.5 may land on either side
        flipped = out.masks != ref_mask
        assert ((torch.stack(ref_values) - 0.5).abs()[flipped] < 1e-5).all()
        assert flipped.float().mean() < 1e-3
    same = (out.masks == ref_mask).unsqueeze(1).expand_as(out.images)
    assert (out.images - ref_img).abs()[same].max() < 1e-5
    # background is the pixel mean (0 after normalisation)
    assert (out.images.permute(1, 0, 2, 3)[:, ~out.masks] == 0).all()


def test_crops_all_empty_and_bad_shapes():
    out = prepare_masked_crops(torch.rand(3, 16, 16), torch.zeros(2, 16, 16), 0.4, 1.0, 8)
    assert out.images.shape == (0, 3, 8, 8) and out.valid.tolist() == [False, False]
    with pytest.raises(ValueError, match="masks"):
        prepare_masked_crops(torch.rand(3, 16, 16), torch.zeros(2, 8, 16), 0.4, 1.0, 8)


def _blob_masks(k, h, w, gen):
    """(k, h, w) soft elliptic blobs in [0, 1]."""
    yy = torch.arange(h).float().view(1, -1, 1)
    xx = torch.arange(w).float().view(1, 1, -1)
    c = torch.rand(k, 2, generator=gen) * torch.tensor([w, h])
    r = (0.05 + 0.3 * torch.rand(k, 2, generator=gen)) * max(h, w)
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
    d = d + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
    return torch.sigmoid(4 * (1 - d))


def _batch_inputs(gen, sizes):
    """Images of ``sizes`` with varied masks: empty, full-image, one-pixel, duplicated masks."""
    images, masks = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(torch.rand(3, h, w, generator=gen) * 255)
        m = _blob_masks(4 + i % 3, h, w, gen)
        if i % 4 == 0:
            m[0] = 0.0  # empty
        if i % 4 == 1:
            m[1] = 1.0  # the whole image
            m[2] = m[3]  # a duplicate (shares its crop with mask 3 only)
        if i % 4 == 2:
            m[1] = 0.0
            m[1, h // 2, w // 3] = 1.0  # one pixel
        if i % 4 == 3:
            m[:] = 0.0  # no valid mask in this image
        masks.append(m)
    masks.append(torch.zeros(0, *sizes[0]))  # an image without masks
    images.append(torch.rand(3, *sizes[0], generator=gen) * 255)
    return images, masks


@pytest.mark.parametrize("resampler", ["roi_align", "separable"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("square", [False, True])
def test_batched_crops_equal_per_image(resampler, mixed, square):
    gen = torch.Generator().manual_seed(3)
    sizes = [(40, 56), (30, 20)] * 3 if mixed else [(40, 56)] * 6
    images, masks = _batch_inputs(gen, sizes)
    kw = dict(mask_thr=0.4, expand_ratio=1.2, out_size=24, square=square, resampler=resampler)
    out = prepare_masked_crops_batch(images, masks, **kw)
    ref = [prepare_masked_crops(i, m, **kw) for i, m in zip(images, masks)]
    assert len(out.valid) == len(images)
    assert all(torch.equal(v, r.valid) for v, r in zip(out.valid, ref))
    counts = [int(r.valid.sum()) for r in ref]
    assert out.image_index.tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    assert torch.equal(out.boxes, torch.cat([r.boxes for r in ref]))
    assert torch.equal(out.masks, torch.cat([r.masks for r in ref]))
    assert torch.allclose(out.images, torch.cat([r.images for r in ref]), rtol=0, atol=1e-5)


def test_batched_crops_without_duplicates_equal_per_image():
    # no duplicate box in the batch: the separable resampler's shared image / mask pass
    gen = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 32, 48, generator=gen) * 255 for _ in range(5)]
    masks = [_blob_masks(3, 32, 48, gen) for _ in images]
    kw = dict(mask_thr=0.4, expand_ratio=1.0, out_size=16)
    out = prepare_masked_crops_batch(images, masks, **kw)
    ref = [prepare_masked_crops(i, m, **kw) for i, m in zip(images, masks)]
    roi = prepare_masked_crops_batch(images, masks, resampler="roi_align", **kw)
    assert torch.equal(out.masks, torch.cat([r.masks for r in ref]))
    assert torch.allclose(out.images, torch.cat([r.images for r in ref]), rtol=0, atol=1e-5)
    flipped = out.masks != roi.masks  # only exact ties at the 0.5 threshold may differ
    assert flipped.float().mean() < 1e-3
    same = (~flipped).unsqueeze(1).expand_as(out.images)
    assert (out.images - roi.images).abs()[same].max() < 1e-5


def test_batched_crops_empty_and_bad_inputs(clip_model):
    out = prepare_masked_crops_batch([], [], out_size=8)
    assert out.images.shape == (0, 3, 8, 8) and out.masks.shape == (0, 8, 8) and out.valid == []
    out = prepare_masked_crops_batch([torch.rand(3, 16, 16)], [torch.zeros(2, 16, 16)], out_size=8)
    assert out.images.shape == (0, 3, 8, 8) and out.valid[0].tolist() == [False, False]
    with pytest.raises(ValueError, match="masks 1"):
        prepare_masked_crops_batch(
            [torch.rand(3, 8, 8)] * 2, [torch.zeros(1, 8, 8), torch.zeros(1, 4, 8)]
        )
    with pytest.raises(ValueError, match="images but"):
        prepare_masked_crops_batch([torch.rand(3, 8, 8)], [])
    clf = MaskedCropClassifier(clip_model=clip_model)
    crops, crop_masks, valid = clf.crop([], [])
    assert crops.shape[0] == crop_masks.shape[0] == 0 and valid == []


def test_jitter_masks_keeps_masks_nonempty():
    m = torch.zeros(4, 20, 20, dtype=torch.bool)
    m[:, 5:12, 6:14] = True
    m[3] = False
    m[3, 10, 10] = True  # erosion would empty it
    out = jitter_masks(m, 2, torch.Generator().manual_seed(0))
    assert out.shape == m.shape and out.flatten(1).any(1).all()
    assert ((out.float() - m.float()).abs().flatten(1).sum(1) <= 20 * 20).all()


# ---------------------------------------------------------------- tokenizer / text classifier
def test_fast_tokenizer_equals_open_clip(clip_model):
    tok = build_tokenizer(clip_model)
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=24)
    texts = [
        "a photo of a red star.",
        "There's the   blue HEXAGON, it's big!",
        "sky above water with a white ring and a black cross",
        " ".join(["word"] * 40),  # truncated
        "caf\u00e9 &amp; cr\u00e8me",  # needs ftfy / html cleaning: slow path
    ]
    assert torch.equal(tok(texts), ref(texts))


def test_text_classifier_cache_and_errors(clip_model, monkeypatch):
    import ov_seg.modeling.clip.text_classifier as text_module

    tc = TextClassifier(clip_model, templates="single")
    calls = []

    def counting(original):
        def encode(model, tokens, *a, **k):
            calls.append(tokens.shape[0])
            return original(model, tokens, *a, **k)

        return encode

    for name in ("encode_tokens", "encode_shared_prefix"):  # whichever path the tower takes
        monkeypatch.setattr(text_module, name, counting(getattr(text_module, name)))
    try:
        vocab = ["red star", "blue circle", "grass"]
        first = tc(vocab)
        assert first.shape == (3, 64)
        assert torch.allclose(first.norm(dim=-1), torch.ones(3))
        n = len(calls)
        assert n == 1 and calls[0] == 3
        assert torch.equal(tc(vocab), first) and len(calls) == n  # cached: not encoded again
        tc(["grass", "red star", "sky"])  # a new vocabulary encodes only the new name
        assert len(calls) == n + 1 and calls[-1] == 1
    finally:
        monkeypatch.undo()
    with pytest.raises(ValueError, match="empty"):
        tc([])
    with pytest.raises(ValueError, match="duplicate"):
        tc(["sky", "grass", "sky"])
    assert all(not p.requires_grad for p in clip_model.transformer.parameters())
    for p in clip_model.parameters():
        p.requires_grad_(True)


def test_text_classifier_templates_average(clip_model):
    tc = TextClassifier(clip_model, templates="vild", void=True)
    assert len(TEMPLATE_SETS["vild"]) == 14 and len(TEMPLATE_SETS["imagenet"]) == 80
    emb = tc(["red star", "sky"])
    assert emb.shape == (3, 64)  # void row appended
    raw = tc.encode_texts([t.format("sky") for t in TEMPLATE_SETS["vild"]])
    assert torch.allclose(emb[1], F.normalize(raw.mean(0), dim=-1), atol=1e-6)
    emb[-1].sum().backward()
    assert tc.void_embedding.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="template set"):
        TextClassifier(clip_model, templates="nope")
    for p in clip_model.parameters():
        p.requires_grad_(True)


def test_compact_vocabulary_state_dict_is_full(clip_model, tmp_path):
    model = build_clip(TINY, None)
    tok = build_tokenizer(model)
    ids = tok(["a red star on the sky"])
    before = model.encode_text(ids)
    emb = install_compact_vocabulary(model, tok, ["a red star on the sky", "a blue circle"])
    assert emb.compact_weight.shape[0] == len(
        tok.vocabulary(["a red star on the sky", "a blue circle"])
    )
    assert torch.allclose(model.encode_text(ids), before)
    sd = model.state_dict()
    assert sd["token_embedding.weight"].shape == (49408, 64)
    # train one step: only the compact rows change, and the full table reflects them
    model.encode_text(ids).sum().backward()
    with torch.no_grad():
        emb.compact_weight -= emb.compact_weight.grad
    path = tmp_path / "c.pth"
    save_clip_checkpoint(str(path), model)
    fresh = build_clip(TINY, str(path))
    assert torch.allclose(fresh.encode_text(ids), model.encode_text(ids), atol=1e-6)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_exact(clip_model, tmp_path):
    path = tmp_path / "clip.pth"
    prompts = torch.randn(3, 64, 64)
    save_clip_checkpoint(str(path), clip_model, mask_prompts=prompts)
    loaded = build_clip(TINY, str(path))
    for (k, a), (k2, b) in zip(clip_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(load_mask_prompts(str(path)), prompts)
    # raw state dicts with "module." prefixes load too
    raw = tmp_path / "raw.pth"
    torch.save({"module." + k: v for k, v in clip_model.state_dict().items()}, raw)
    assert torch.equal(build_clip(TINY, str(raw)).visual.proj, clip_model.visual.proj)
    assert load_mask_prompts(str(raw)) is None


def test_wrong_checkpoint_names_keys(clip_model, tmp_path):
    sd = dict(clip_model.state_dict())
    sd.pop("visual.proj")
    sd["visual.extra_weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(KeyError, match=r"visual\.proj.*visual\.extra_weight"):
        build_clip(TINY, str(path))
    with pytest.raises(FileNotFoundError):
        build_clip(TINY, str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------- crop classifier, losses
def test_masked_crop_classifier(clip_model):
    clf = MaskedCropClassifier(
        clip_model=clip_model, prompt_depth=2, templates="toyworld", register_clip=False
    )
    assert set(clf.state_dict()) == {"encoder.prompts"}
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 40, 56) * 255]
    masks = [torch.rand(3, 64, 64), torch.zeros(2, 40, 56)]
    masks[1][0, 5:20, 5:30] = 1
    logits, valid = clf(images, masks, ["red star", "sky", "blue circle", "grass"])
    assert [lo.shape for lo in logits] == [(3, 4), (2, 4)]
    assert valid[1].tolist() == [True, False] and (logits[1][1] == 0).all()
    emb, _ = clf.embed(images, masks)
    assert emb.shape == (4, 64)
    for p in clip_model.parameters():
        p.requires_grad_(True)


def test_info_nce_matches_definition():
    g = torch.Generator().manual_seed(0)
    a, b, neg = (
        torch.randn(5, 8, generator=g),
        torch.randn(5, 8, generator=g),
        torch.randn(3, 8, generator=g),
    )
    an, bn, nn_ = F.normalize(a, dim=-1), F.normalize(b, dim=-1), F.normalize(neg, dim=-1)
    s = 10.0
    logits = s * an @ bn.t()
    t = torch.arange(5)
    ref = (
        F.cross_entropy(torch.cat([logits, s * an @ nn_.t()], 1), t)
        + F.cross_entropy(logits.t(), t)
    ) / 2
    assert torch.allclose(info_nce(a, b, s, b_negatives=neg), ref)
    assert torch.allclose(info_nce(a, b, s, symmetric=False), F.cross_entropy(logits, t))
    z = contrastive_classification(
        torch.zeros(0, 8, requires_grad=True), bn, torch.zeros(0, dtype=torch.long), s
    )
    assert z.item() == 0.0
