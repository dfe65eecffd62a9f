"""Prompts of one template encoded with their shared first tokens run once
(``encode_shared_prefix``): the same embeddings as the full context, within float rounding."""

import copy

import pytest
import torch

from ov_seg.modeling.clip import TextClassifier, build_clip
from ov_seg.modeling.clip.text_classifier import (
    _prefix_sharable,
    encode_shared_prefix,
    shared_prefix_length,
    token_lengths,
)

NAMES = ["red star", "sky", "purple hexagon", "a", "blue circle on grass", "water"]


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return build_clip("ovseg-tiny-vit8-64", None).eval()


def test_shared_prefix_length():
    tokens = torch.tensor([[9, 5, 6, 7, 1, 0], [9, 5, 6, 8, 3, 1], [9, 5, 6, 7, 2, 1]])
    assert shared_prefix_length(tokens) == 3
    same = torch.tensor([[9, 5, 1, 0], [9, 5, 1, 0]])
    assert shared_prefix_length(same) == 2  # the end token stays out of the prefix


@pytest.mark.parametrize("template", ["a photo of a {}.", "{} in the scene", "There is a small {}"])
def test_equals_full_context(clip_model, template):
    assert _prefix_sharable(clip_model)
    tc = TextClassifier(clip_model, templates="single")
    tokens = tc.tokenizer([template.format(n) for n in NAMES])
    prefix = shared_prefix_length(tokens)
    assert prefix == template.split("{}")[0].count(" ") + 1  # start token + the words before
    with torch.no_grad():
        full = clip_model.encode_text(tokens)
        shared = encode_shared_prefix(clip_model, tokens, prefix)
        one = encode_shared_prefix(clip_model, tokens[2:3], shared_prefix_length(tokens[2:3]))
    assert (shared - full).abs().max() < 1e-5
    assert (one[0] - full[2]).abs().max() < 1e-5
    assert int(token_lengths(tokens).max()) < tokens.shape[1]


def test_classifier_equals_plain_classifier(clip_model):
    plain = TextClassifier(clip_model, templates="vild", trim_context=False, batch_size=10**6)
    fast = TextClassifier(clip_model, templates="vild", batch_size=4)
    assert (fast.class_embeddings(NAMES) - plain.class_embeddings(NAMES)).abs().max() < 1e-5


def test_towers_it_cannot_reproduce_fall_back(clip_model):
    other = copy.deepcopy(clip_model)
    other.attn_mask = torch.zeros_like(other.attn_mask)  # not causal
    assert not _prefix_sharable(other)
    tc = TextClassifier(other, templates="single")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            other.encode_text(tc.tokenizer([f"a photo of a {n}." for n in NAMES])), dim=-1
        )
    assert (tc.class_embeddings(NAMES) - expected).abs().max() < 1e-5
