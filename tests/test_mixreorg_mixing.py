"""MixReorg's mixing transform and segmentation loss (ov_seg.modeling.losses.mixing)."""

import math

import pytest
import torch

from ov_seg.modeling.losses.mixing import (
    make_mix_plan,
    mix_tokens,
    mixed_segmentation_loss,
    restore_tokens,
    tuple_mean,
)


def _ids(batch, grid):
    """(B, N, 2) tokens that name themselves: (image index, position)."""
    n = grid[0] * grid[1]
    b = torch.arange(batch)[:, None].expand(batch, n)
    i = torch.arange(n)[None, :].expand(batch, n)
    return torch.stack([b, i], dim=-1)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_mix,cell,grid", [(2, 1, (4, 4)), (3, 2, (5, 7)), (4, 3, (8, 8))])
def test_mixing_is_a_permutation_and_restores_exactly(batch, num_mix, cell, grid):
    g = torch.Generator().manual_seed(batch * 100 + num_mix)
    plan = make_mix_plan(batch, grid, num_mix=num_mix, cell=cell, generator=g)
    x = torch.randn(batch, grid[0] * grid[1], 5, generator=g)
    mixed = mix_tokens(x, plan)
    # every token appears exactly once among the mixed images, at its own position
    for i in range(x.shape[1]):
        assert sorted(plan.source[:, i].tolist()) == list(range(batch))
    assert torch.equal(restore_tokens(mixed, plan), x)
    assert torch.equal(mix_tokens(restore_tokens(x, plan), plan), x)
    assert torch.equal(
        torch.sort(mixed.reshape(-1, 5), dim=0).values, torch.sort(x.reshape(-1, 5), dim=0).values
    )


@pytest.mark.parametrize("cell", [1, 2])
def test_mixed_label_map_matches_source_of_each_patch(cell):
    grid, batch, m = (6, 6), 6, 3
    plan = make_mix_plan(
        batch, grid, num_mix=m, cell=cell, generator=torch.Generator().manual_seed(1)
    )
    mixed = mix_tokens(_ids(batch, grid), plan)
    assert torch.equal(mixed[..., 0], plan.source)  # the label map is the source image
    assert torch.equal(mixed[..., 1], torch.arange(36).expand(batch, 36))  # positions are kept
    # sources stay inside the tuple; every mixed image takes its uniform share from each member
    tuple_of = torch.arange(batch) // m
    assert torch.equal(tuple_of[plan.source], tuple_of[:, None].expand(batch, 36))
    for b in range(batch):
        counts = torch.bincount(plan.source[b] - (b // m) * m, minlength=m)
        assert counts.tolist() == [12, 12, 12]
    # all tokens of one c x c cell come from the same source
    src = plan.source.reshape(batch, 6, 6)
    for r in range(0, 6, cell):
        for c in range(0, 6, cell):
            block = src[:, r : r + cell, c : c + cell].reshape(batch, -1)
            assert (block == block[:, :1]).all()
    # the mixing differs between the two images of a tuple at every position (cyclic shift)
    assert (plan.source[0] != plan.source[1]).all()


def test_shares_and_odd_batch():
    plan = make_mix_plan(5, (4, 4), num_mix=2, shares=[0.75, 0.25], generator=torch.Generator())
    # mixed image m takes share k from member (k + m) mod M: each keeps 75% of its own tokens
    assert (plan.source[0] == 0).sum() == 12 and (plan.source[1] == 1).sum() == 12
    assert torch.equal(plan.source[4], torch.full((16,), 4))  # the last image has no partner
    with pytest.raises(ValueError):
        make_mix_plan(4, (2, 2), num_mix=3, shares=[1.0, 1.0])
    with pytest.raises(ValueError):
        make_mix_plan(0, (2, 2))


def test_tuple_mean():
    plan = make_mix_plan(3, (2, 2), num_mix=2, generator=torch.Generator())
    x = torch.tensor([[1.0], [3.0], [10.0]])
    assert torch.allclose(tuple_mean(x, plan), torch.tensor([[2.0], [2.0], [10.0]]))


def _loss_inputs(batch, n=16, groups=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, groups, dim, generator=g, requires_grad=True)
    a = torch.randn(batch, n, groups, generator=g).softmax(-1).requires_grad_()
    t = torch.randn(batch, dim, generator=g)
    return z, a, t


def test_segmentation_loss_batch_of_one_is_finite_and_zero():
    z, a, t = _loss_inputs(1)
    plan = make_mix_plan(1, (4, 4), num_mix=2)
    loss = mixed_segmentation_loss(z, a, t, plan, torch.tensor(10.0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(z.grad).all() and torch.isfinite(a.grad).all()


def test_segmentation_loss_identical_captions_is_log_m():
    z, a, t = _loss_inputs(4)
    t = t[:1].expand(4, -1)  # identical images / captions: no way to tell the sources apart
    plan = make_mix_plan(4, (4, 4), num_mix=2, generator=torch.Generator().manual_seed(0))
    loss = mixed_segmentation_loss(z, a, t, plan, torch.tensor(100.0))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)
    assert torch.isfinite(z.grad).all()


def test_segmentation_loss_learns_the_sources():
    """Perfect segments (one per source, aligned with its caption) give a near-zero loss; swapping
    the labels gives a large one."""
    grid, batch = (4, 4), 2
    plan = make_mix_plan(batch, grid, num_mix=2, generator=torch.Generator().manual_seed(3))
    t = torch.eye(2, 8)
    z = torch.stack([t, t])  # segment k of every mixed image is caption k's embedding
    a = torch.nn.functional.one_hot(
        plan.source, 2
    ).float()  # token i is in the segment of its source
    good = mixed_segmentation_loss(z, a, t, plan, torch.tensor(100.0))
    bad = mixed_segmentation_loss(z, 1 - a, t, plan, torch.tensor(100.0))
    assert good.item() < 1e-3 and bad.item() > 10
    mask = torch.zeros(batch, 16, dtype=torch.bool)
    mask[:, :3] = True
    assert torch.isfinite(mixed_segmentation_loss(z, a, t, plan, torch.tensor(100.0), mask))


def test_segmentation_loss_batch_negatives():
    """With batch negatives a token picks its source caption among all B captions: identical
    captions give log B, and the tuple-only loss is never larger."""
    z, a, t = _loss_inputs(4)
    plan = make_mix_plan(4, (4, 4), num_mix=2, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(10.0)
    tuple_loss = mixed_segmentation_loss(z, a, t, plan, scale)
    batch_loss = mixed_segmentation_loss(z, a, t, plan, scale, batch_negatives=True)
    batch_loss.backward()
    assert torch.isfinite(z.grad).all()
    assert batch_loss.item() >= tuple_loss.item() - 1e-6
    same = t[:1].expand(4, -1)
    loss = mixed_segmentation_loss(z.detach(), a.detach(), same, plan, scale, batch_negatives=True)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-5)
