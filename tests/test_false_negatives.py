"""Captions that say the same thing are no negatives of each other in CLIP pre-training:
``CaptionContent`` keys, ``info_nce(..., same=)``, and ``CLIPPretrain`` on the toy world's captions.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import setup_config

from ov_seg.data.caption_content import CaptionContent, normalize_caption
from ov_seg.data.toyworld.render import CAPTION_TEMPLATES
from ov_seg.modeling.losses.contrastive import info_nce
from ov_seg.modeling.meta_arch.clip_pretrain import CLIPPretrain, caption_templates


def test_normalize_caption():
    assert normalize_caption("  A  Red\tStar. ") == "a red star"
    assert normalize_caption("a red star") == "a red star"


def test_caption_content_keys_on_fields():
    content = CaptionContent(["a photo of {L}", "{L}", "a photo of {L} on the {s}", "{s} with {L}"])
    assert content.num_templates == 4
    # the same content under different templates, case, spacing and a final period
    assert content("a photo of a red star") == content("A red star.") == "L=a red star"
    # the most literal template wins: "a photo of {L}" would take "a red star on the grass" as L
    assert content("a photo of a red star on the grass") == content("grass with a red star")
    assert content("a photo of a red star on the grass") == "L=a red star\x1fs=grass"
    assert content("a photo of a red star") != content("a photo of a red star on the grass")
    assert content("a photo of a blue star") != content("a photo of a red star")


def test_caption_content_without_templates_keys_on_text():
    content = CaptionContent()
    assert content.num_templates == 0
    assert content("A red  star.") == content("a red star") == "a red star"
    assert content("a photo of a red star") != content("a red star")
    # repeated templates count once; a repeated field must repeat its text
    rep = CaptionContent(["{L} and {L}", "{L} and {L}", "x {s}"])
    assert rep.num_templates == 2
    assert rep("a cat and a cat") == "L=a cat"
    assert rep("a cat and a dog") == "a cat and a dog"


@pytest.mark.parametrize("bad", ["{0} photo", "{}", "{L!r}", "{L:>4}", "{L.name}"])
def test_caption_content_rejects_unnamed_or_formatted_fields(bad):
    with pytest.raises(ValueError, match="plain names"):
        CaptionContent([bad])


def test_info_nce_same_leaves_pairs_out_of_both_directions():
    g = torch.Generator().manual_seed(0)
    a, b, neg = (torch.randn(n, 8, generator=g) for n in (4, 4, 2))
    s = 7.0
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 2] = True  # one direction given: the pair is symmetric
    an, bn, nn_ = F.normalize(a, dim=-1), F.normalize(b, dim=-1), F.normalize(neg, dim=-1)
    logits = s * an @ bn.t()
    masked = logits.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    t = torch.arange(4)
    ref = (
        F.cross_entropy(torch.cat([masked, s * an @ nn_.t()], 1), t)
        + F.cross_entropy(masked.t(), t)
    ) / 2
    assert torch.allclose(info_nce(a, b, s, b_negatives=neg, same=same), ref)
    # the diagonal is ignored; no pair marked = plain InfoNCE
    assert torch.allclose(info_nce(a, b, s, same=torch.eye(4, dtype=torch.bool)), info_nce(a, b, s))
    assert not torch.allclose(info_nce(a, b, s, same=same), info_nce(a, b, s))


def test_info_nce_duplicates_no_longer_cap_the_loss():
    """Two images of one content with two captions of it: as negatives of each other they hold
    the loss at ≥ log 2 however well the model matches them; left out, it goes to 0."""
    emb = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert info_nce(emb, emb, 100.0).item() > math.log(2) * 2 / 3 - 1e-4
    assert info_nce(emb, emb, 100.0, same=same).item() < 1e-6


def test_info_nce_same_errors():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="bool"):
        info_nce(a, a, 1.0, same=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        info_nce(a, a, 1.0, same=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="diagonal"):
        info_nce(a, a, 1.0, symmetric=False, targets=torch.arange(3), same=torch.eye(3) > 0)


def test_toyworld_caption_templates_round_trip(toyworld_root):
    """Every toy-world template filled with known values keys on exactly those values, so that
    the same content written with any template shares one key and other content does not."""
    assert MetadataCatalog.get("toyworld_captions_web").caption_templates == list(CAPTION_TEMPLATES)
    assert caption_templates(["toyworld_captions_web", "toyworld_captions_train"]) == list(
        CAPTION_TEMPLATES
    )
    content = CaptionContent(CAPTION_TEMPLATES)
    values = {"L": "two blue rings and a red star", "s": "grass", "s2": "sand"}
    for phrase in ("a red star", "two blue rings and a red star", "an orange cross, a red star"):
        for template in CAPTION_TEMPLATES:
            fields = {k: v for k, v in {**values, "L": phrase}.items() if "{" + k + "}" in template}
            key = content(template.format(**fields))
            assert key == "\x1f".join(f"{k}={v}" for k, v in sorted(fields.items())), template
    # the generated captions and hard negatives: each keys on a template with text around {L}
    # (none falls back to the bare "{L}"), and object photos of one name share a key
    bare = CaptionContent(t for t in CAPTION_TEMPLATES if t != "{L}")
    texts = []
    for d in DatasetCatalog.get("toyworld_captions_web"):
        texts += list(d["captions"]) + list(d.get("hard_negatives") or [])
    assert texts
    photos = {}
    for t in texts:
        key = content(t)
        assert key.startswith("L=") and (bare(t) == key or normalize_caption(t) == key[2:]), t
        if "\x1f" not in key:
            photos.setdefault(key, set()).add(normalize_caption(t))
    assert sum(len(v) > 1 for v in photos.values()) >= len(photos) // 2


def test_info_nce_hard_negative_columns_of_the_same_content():
    """A hard negative that says what a_i's caption says leaves a_i's negatives only."""
    g = torch.Generator().manual_seed(1)
    a, b, neg = (torch.randn(3, 8, generator=g) for _ in range(3))
    same_neg = torch.tensor([[False, True, False], [False, False, False], [True, False, False]])
    s = 5.0
    an, bn, nn_ = F.normalize(a, dim=-1), F.normalize(b, dim=-1), F.normalize(neg, dim=-1)
    logits = s * an @ bn.t()
    cols = (s * an @ nn_.t()).masked_fill(same_neg, float("-inf"))
    t = torch.arange(3)
    ref = (F.cross_entropy(torch.cat([logits, cols], 1), t) + F.cross_entropy(logits.t(), t)) / 2
    got = info_nce(a, b, s, b_negatives=neg, same_negatives=same_neg)
    assert torch.allclose(got, ref)
    with pytest.raises(ValueError, match=r"\(3, 3\) bool"):
        info_nce(a, b, s, b_negatives=neg, same_negatives=same_neg[:, :2])
    with pytest.raises(ValueError, match=r"\(3, 0\)"):
        info_nce(a, b, s, same_negatives=same_neg)


def test_info_nce_every_negative_masked_stays_finite():
    """Rows whose every negative is masked keep only their positive: loss and gradients (the
    embeddings' and a learnable logit scale's) stay finite."""
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    neg = torch.randn(2, 8, requires_grad=True)
    t = torch.zeros((), requires_grad=True)
    same = torch.ones(4, 4, dtype=torch.bool)
    loss = info_nce(a, b, t.exp(), b_negatives=neg, same=same, same_negatives=torch.ones(4, 2) > 0)
    loss.backward()
    assert loss.item() == 0.0
    for x in (a, b, neg, t):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("content", [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]),
        ("exact", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]),
        ("none", None),
    ],
)
def test_clip_pretrain_same_content(toyworld_root, mode, expected):
    cfg = setup_config(
        "configs/toyworld/clip_pretrain.yaml",
        ["MODEL.DEVICE", "cpu", "MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES", mode],
    )
    model = CLIPPretrain(**CLIPPretrain.from_config(cfg))
    captions = [
        "a photo of a red star",
        "a close-up photo of a red star",
        "a blue ring on the grass",
        "A blue ring on the grass.",
    ]
    negatives = ["a photo of a blue ring on the grass", "a photo of a red ring"]
    same, same_negatives = model.same_content(captions, negatives)
    if expected is None:
        assert same is None and same_negatives is None
    else:
        assert same.tolist() == [[bool(v) for v in row] for row in expected]
        # a hard negative of another pair that says what a caption says is no negative of it
        content = [[0, 0], [0, 0], [1, 0], [1, 0]]
        exact = [[0, 0], [0, 0], [0, 0], [0, 0]]
        assert same_negatives.tolist() == [
            [bool(v) for v in row] for row in (content if mode == "content" else exact)
        ]
        assert model.same_content(captions)[1] is None


def test_clip_pretrain_rejects_unknown_mode(toyworld_root):
    cfg = setup_config(
        "configs/toyworld/clip_pretrain.yaml",
        ["MODEL.DEVICE", "cpu", "MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES", "soft"],
    )
    with pytest.raises(ValueError, match="FALSE_NEGATIVES"):
        CLIPPretrain(**CLIPPretrain.from_config(cfg))
