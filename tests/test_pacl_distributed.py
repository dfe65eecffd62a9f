"""PACL's multi-worker loss (2 gloo processes on CPU) equals the single-process loss on the whole
batch, and its gradients, summed over workers by the differentiable all-gather, equal W x the
single-process ones (DDP then averages them over the W workers)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ov_seg.modeling.losses.pacl import pacl_info_nce

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    texts = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[4, 3:] = False
    return patches, texts, mask


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        patches, texts, mask = _data()
        local = slice(rank * 3, rank * 3 + 3)
        v = patches[local].clone().requires_grad_(True)
        loss = pacl_info_nce(v, texts[local], 7.0, chunk_size=2, patch_mask=mask[local])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": v.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_match_one_process(tmp_path):
    # fork: the workers reuse the imported modules (spawn would re-import the whole package)
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork"
    )
    outs = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    patches, texts, mask = _data()
    v = patches.clone().requires_grad_(True)
    loss = pacl_info_nce(v, texts, 7.0, chunk_size=2, patch_mask=mask)
    loss.backward()
    torch.testing.assert_close(sum(o["loss"] for o in outs) / WORLD, loss.detach())
    grads = torch.cat([o["grad"] for o in outs])
    torch.testing.assert_close(grads, WORLD * v.grad)
