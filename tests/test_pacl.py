"""PACL: φ vs a naive double loop, bounded chunk memory, gradients, inference shapes, geometry."""

import math

import pytest
import torch
import torch.nn.functional as F

from ov_seg.modeling.clip import build_clip
from ov_seg.modeling.heads.pacl import CLIPProjectionEmbedder, build_pacl_embedder
from ov_seg.modeling.losses.pacl import (
    pacl_compatibility,
    pacl_info_nce,
    patch_text_cosine,
    text_group_ids,
)
from ov_seg.modeling.meta_arch import pacl as pacl_module
from ov_seg.modeling.meta_arch.pacl import PACL


def naive_phi(patches, texts, temperature=1.0, mask=None):
    """φ(x_b, y_c) pair by pair, patch by patch."""
    out = torch.zeros(patches.shape[0], texts.shape[0], dtype=patches.dtype)
    for b in range(patches.shape[0]):
        keep = (
            range(patches.shape[1])
            if mask is None
            else [i for i in range(patches.shape[1]) if mask[b, i]]
        )
        for c in range(texts.shape[0]):
            sims = torch.stack([F.cosine_similarity(patches[b, i], texts[c], dim=0) for i in keep])
            attn = torch.softmax(sims / temperature, dim=0)
            pooled = sum(a * patches[b, i] for a, i in zip(attn, keep))
            out[b, c] = F.cosine_similarity(pooled, texts[c], dim=0)
    return out


@pytest.mark.parametrize("chunk_size", [0, 1, 3])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_phi_matches_naive_loop_values_and_gradients(chunk_size, checkpoint):
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 0] = False
    phi = pacl_compatibility(
        patches,
        texts,
        temperature=0.3,
        chunk_size=chunk_size,
        patch_mask=mask,
        checkpoint=checkpoint,
    )
    ref = naive_phi(patches, texts, 0.3, mask)
    torch.testing.assert_close(phi, ref)
    weights = torch.randn(4, 5, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((phi * weights).sum(), (patches, texts))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (patches, texts))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_phi_is_not_the_own_caption_shortcut():
    """Off-diagonal entries pool each image with the *other* text (the known wrong shortcut pools
    each image with its own caption only)."""
    g = torch.Generator().manual_seed(1)
    patches, texts = torch.randn(3, 5, 4, generator=g), torch.randn(3, 4, generator=g)
    phi = pacl_compatibility(patches, texts)
    own = torch.stack([naive_phi(patches[b : b + 1], texts[b : b + 1])[0, 0] for b in range(3)])
    own_pooled = torch.stack(
        [
            (
                torch.softmax(patch_text_cosine(patches[b : b + 1], texts[b : b + 1])[0, 0], 0)[
                    :, None
                ]
                * patches[b]
            ).sum(0)
            for b in range(3)
        ]
    )
    shortcut = F.normalize(own_pooled, dim=-1) @ F.normalize(texts, dim=-1).t()
    torch.testing.assert_close(phi.diagonal(), own)
    assert not torch.allclose(phi, shortcut)


def test_info_nce_on_phi():
    g = torch.Generator().manual_seed(2)
    patches, texts = torch.randn(5, 7, 4, generator=g), torch.randn(5, 4, generator=g)
    loss = pacl_info_nce(patches, texts, 10.0, chunk_size=2)
    logits = 10.0 * naive_phi(patches, texts)
    target = torch.arange(5)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(loss, ref)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while running ``fn``."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def test_chunked_checkpointing_bounds_saved_memory():
    """With checkpointed chunks, the memory kept for backward does not grow with B x B."""
    n, d, chunk = 16, 8, 4

    def run(b, checkpoint):
        patches = torch.randn(b, n, d, requires_grad=True)
        texts = torch.randn(b, d)
        return _saved_bytes(
            lambda: pacl_compatibility(patches, texts, chunk_size=chunk, checkpoint=checkpoint)
        )

    small, large = run(16, True), run(64, True)
    # inputs (B x N x D, twice) + per-chunk text slices and outputs: linear in B
    assert large <= 4 * small * 1.1
    dense_small, dense_large = run(16, False), run(64, False)
    assert (
        dense_large >= 10 * dense_small
    )  # B x B x N attention maps: quadratic without checkpointing
    assert large < dense_large / 5


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip("ovseg-tiny-vit8-64")


def _model(clip, embedder="residual_mlp", **kwargs):
    kwargs.setdefault("templates", ("a photo of a {}",))
    return PACL(clip_model=clip, embedder=build_pacl_embedder(embedder, clip), **kwargs)


def _image(h, w, seed=0):
    return torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_only_embedder_and_logit_scale_get_gradients(tiny_clip):
    model = _model(tiny_clip).train()
    assert not model.clip.training
    inputs = [
        {"image": _image(64, 64, i), "captions": [f"a red star on the grass {i}"]} for i in range(3)
    ]
    inputs.append(
        {"image": _image(48, 40, 9), "captions": ["a blue ring"]}
    )  # padded: masked patches
    for x in inputs:  # the caption mapper's field: the noun phrases of each caption
        x["nouns"] = [c.split()[-1:] for c in x["captions"]]
    losses = model(inputs)
    assert set(losses) == {"loss_pacl_caption", "loss_pacl_noun"}
    sum(losses.values()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad == {"logit_scale"} | {
        f"embedder.{n}" for n, _ in model.embedder.named_parameters()
    }
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in with_grad)


def test_residual_mlp_size_read_from_model(tiny_clip):
    emb = build_pacl_embedder("residual_mlp", tiny_clip)
    d_v, dim = tiny_clip.visual.proj.shape
    assert sum(p.numel() for p in emb.parameters()) == (d_v * dim + dim) + (dim * dim + dim) + (
        d_v * dim + dim
    )


def test_vanilla_baseline_is_clip_projection(tiny_clip):
    """Baseline patches = tokens @ visual.proj; with an average-pooling tower their mean is CLIP's
    image embedding. The baseline has nothing to train."""
    model = _model(tiny_clip, embedder="clip_projection", prompt_weight=0.0)
    assert isinstance(model.embedder, CLIPProjectionEmbedder)
    assert not any(p.requires_grad for p in model.parameters())
    images = model.normalize(torch.stack([_image(64, 64, 3), _image(64, 64, 4)]).float())
    patches, grid = model.patch_embeddings(images)
    assert grid == (8, 8)
    with torch.no_grad():
        ref = tiny_clip.encode_image(images)
    torch.testing.assert_close(patches.mean(1), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.current_logit_scale(), tiny_clip.logit_scale.exp())


@pytest.mark.parametrize(
    "mode,stride,size",
    [
        ("shift", 8, (37, 53)),
        ("shift", 4, (64, 64)),
        ("shift", 4, (5, 9)),
        ("shift", 2, (37, 53)),
        ("conv", 4, (37, 53)),
        ("conv", 4, (5, 9)),
    ],
)
def test_inference_shapes_at_odd_sizes(tiny_clip, mode, stride, size):
    model = _model(tiny_clip, stride_mode=mode, infer_stride=stride).eval()
    h, w = size
    vocab = ["red star", "grass", "blue ring"]
    out = model([{"image": _image(h, w), "vocabulary": vocab, "height": 2 * h + 1, "width": 3 * w}])
    sem_seg = out[0]["sem_seg"]
    assert sem_seg.shape == (3, 2 * h + 1, 3 * w)
    assert torch.isfinite(sem_seg).all()
    torch.testing.assert_close(sem_seg.sum(0), torch.ones(sem_seg.shape[1:]))


def test_background_channel(tiny_clip):
    vocab = ["background", "red star", "grass"]
    x = {"image": _image(40, 40), "vocabulary": vocab}
    always = _model(tiny_clip, bg_mode="score", bg_score=2.0, infer_stride=8).eval()
    out = always([x])[0]["sem_seg"]
    assert (out[0] == 1).all() and (out[1:] == 0).all()
    never = _model(tiny_clip, bg_mode="entropy", bg_entropy=10.0, infer_stride=8).eval()
    out = never([x])[0]["sem_seg"]
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1:].sum(0), torch.ones(40, 40))


class _AvgPoolPatches:
    """Stand-in encoder + embedder: a patch's embedding is its mean colour (shift-equivariant)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, images):
        pooled = F.avg_pool2d(images, self.p)  # (B, 3, h, w)
        return pooled.flatten(2).transpose(1, 2), tuple(pooled.shape[-2:])


@pytest.mark.parametrize("stride", [8, 4, 2])
def test_shift_trick_geometry(tiny_clip, monkeypatch, stride):
    """The interleaved passes form the regular stride-s map of patch features: cell m is the patch
    centred at s·m + s/2, i.e. avg_pool(kernel p, stride s) of the image padded by (p - s) / 2."""
    p, h, w = 8, 29, 22
    model = _model(tiny_clip, infer_stride=stride).eval()
    monkeypatch.setattr(model, "patch_embeddings", _AvgPoolPatches(p))
    monkeypatch.setattr(pacl_module, "patch_text_cosine", lambda v, t: v.transpose(1, 2))
    image = torch.randn(3, h, w, dtype=torch.float64)
    got = model._dense_cosines_shift(image, None)
    pad, r = (p - stride) // 2, p // stride
    # the passes cover ceil(ceil(size / s) / r) * r cells per side (a few beyond the image)
    fh, fw = (math.ceil(math.ceil(x / stride) / r) * r for x in (h, w))
    padded = F.pad(
        image, (pad, (fw - 1) * stride + p - pad - w, pad, (fh - 1) * stride + p - pad - h)
    )
    ref = F.avg_pool2d(padded[None], p, stride=stride)
    ref = F.interpolate(ref, scale_factor=stride, mode="bilinear", align_corners=False)[
        0, :, :h, :w
    ]
    torch.testing.assert_close(got, ref)


def test_conv_trick_matches_strided_patch_embedding(tiny_clip):
    """The conv variant's tokens come from conv1 applied at the inference stride."""
    model = _model(tiny_clip, stride_mode="conv", infer_stride=4).eval()
    enc = model._strided_encoder
    image = model.normalize(_image(24, 32).float())[None]
    captured = {}
    handle = tiny_clip.visual.conv1.register_forward_hook(
        lambda m, i, o: captured.setdefault("o", o)
    )
    try:
        out = enc(image)
    finally:
        handle.remove()
    assert out.grid == (5, 7) and out.tokens.shape[1] == 35
    ref = F.conv2d(image, tiny_clip.visual.conv1.weight, stride=4)
    torch.testing.assert_close(captured["o"], ref)
    assert tiny_clip.visual.conv1.stride == (8, 8)  # restored


@pytest.mark.parametrize("captions", [[""], ["   "], []])
def test_empty_caption_is_a_clear_error(tiny_clip, captions):
    model = _model(tiny_clip).train()
    inputs = [
        {"image": _image(64, 64), "captions": ["a red star"]},
        {"image": _image(64, 64), "captions": captions, "file_name": "img_7.png"},
    ]
    with pytest.raises(ValueError, match="img_7.png: empty caption"):
        model(inputs)


def test_bad_settings_are_clear_errors(tiny_clip):
    with pytest.raises(ValueError, match="INFER_STRIDE"):
        _model(tiny_clip, infer_stride=3)
    with pytest.raises(ValueError, match="STRIDE_MODE"):
        _model(tiny_clip, stride_mode="dilate")
    with pytest.raises(KeyError, match="PACL embedder"):
        build_pacl_embedder("mlp", tiny_clip)
    with pytest.raises(ValueError, match="vocabulary"):
        _model(tiny_clip).eval()([{"image": _image(16, 16)}])


def test_identical_texts_are_not_negatives():
    """Two images whose texts say the same thing: with text groups the other one is no negative,
    so a batch of two identical pairs has zero loss whatever the scores (plain InfoNCE: log 2)."""
    torch.manual_seed(0)
    patches = torch.randn(2, 5, 8)
    text = torch.randn(1, 8)
    texts = text.expand(2, 8).clone()
    plain = pacl_info_nce(patches, texts, 10.0)
    groups = text_group_ids(["a red star", "A red star "])
    grouped = pacl_info_nce(patches, texts, 10.0, text_groups=groups)
    assert plain.item() > 0.1
    assert grouped.item() == pytest.approx(0.0, abs=1e-6)
    # a third, different text keeps its negatives: only the (0, 1) / (1, 0) pairs leave the
    # softmaxes (checked against a hand-masked cross-entropy in both directions)
    patches3 = torch.randn(3, 5, 8)
    texts3 = torch.cat([texts, torch.randn(1, 8)])
    g3 = text_group_ids([("red star",), ("red star",), ("blue circle", "grass")])
    loss3 = pacl_info_nce(patches3, texts3, 10.0, text_groups=g3)
    logits = 10.0 * pacl_compatibility(patches3, texts3)
    mask = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    masked = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(3)
    expected = (F.cross_entropy(masked, target) + F.cross_entropy(masked.t(), target)) / 2
    assert loss3.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss3.item() < pacl_info_nce(patches3, texts3, 10.0).item()
    with pytest.raises(ValueError, match="text_groups"):
        pacl_info_nce(patches3, texts3, 10.0, text_groups=g3[:2])


def test_training_groups_same_nouns(tiny_clip, monkeypatch):
    """PACL's losses pass text groups built from the nouns (EXCLUDE_SAME_TEXT), none when off."""
    import ov_seg.modeling.meta_arch.pacl as pacl_mod

    seen = []

    def spy(patches, texts, scale, **kwargs):
        seen.append(kwargs.get("text_groups"))
        return texts.sum() * 0 + patches.sum() * 0

    monkeypatch.setattr(pacl_mod, "pacl_info_nce", spy)
    inputs = [
        {"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "captions": [c], "nouns": [n]}
        for c, n in (
            ("a red star on the grass", ["red star", "grass"]),
            ("a red star on grass", ["red star", "grass"]),
            ("a blue circle", ["blue circle"]),
        )
    ]
    for exclude in (True, False):
        seen.clear()
        model = pacl_mod.PACL(
            clip_model=tiny_clip,
            embedder=build_pacl_embedder("residual_mlp", tiny_clip),
            exclude_same_text=exclude,
        ).train()
        model.losses(inputs)
        if not exclude:
            assert seen == [None, None]
            continue
        caption_groups, noun_groups = seen
        assert caption_groups[0] == caption_groups[1] != caption_groups[2]
        assert noun_groups.shape == (3,)
