#!/usr/bin/env python
"""Time the two-stage model stage by stage: proposals, crop preparation, CLIP, text, fusion.

    OMP_NUM_THREADS=1 python tools/benchmark_two_stage.py \\
        --config-file configs/toyworld/two_stage_R18.yaml --size 640x480 --proposals 100 \\
        --iters 3 MODEL.CLIP.PRETRAINED ""

Random weights unless the config / opts give some; a random image of the given size. Prints ms/image
per stage (mean over ``--iters`` after ``--warmup`` runs), the number of crops CLIP encoded, and the
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size, and its
growth during the timed runs). "text_cached" is the usual case (a vocabulary is encoded once, before
timing, in every text classifier); "text_uncached" encodes ``--text-names`` never-seen names, and
``text_ms_per_new_name`` is the cost of one new class name.
"""

import argparse
import json
import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from detectron2.checkpoint import DetectionCheckpointer

import ov_seg  # noqa: F401 (registration)
from ov_seg.engine import Trainer
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.heads.ensemble import with_background_name
from ov_seg.utils.threads import set_num_threads

STAGES = ("proposals", "crop_prep", "clip", "text_uncached", "text_cached", "fusion")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a TwoStageOVSeg config")
    p.add_argument("--size", default="640x480", help="image W x H")
    p.add_argument(
        "--proposals", type=int, default=100, help="proposals per image (NUM_OBJECT_QUERIES)"
    )
    p.add_argument(
        "--vocabulary-size", type=int, default=150, help="class names (synthetic: 'class 0', ...)"
    )
    p.add_argument(
        "--text-names", type=int, default=10, help="new names encoded per run (text_uncached)"
    )
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="", help="also write the numbers to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.ms = defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[name].append(1000.0 * (time.perf_counter() - t0))


@torch.no_grad()
def warm_text_caches(model, vocabulary) -> None:
    """Encode the vocabulary once, untimed, in every text classifier of the model (the CLIP branch's
    and the open-vocabulary proposal head's): in use, a vocabulary is encoded once, then cached."""
    model.text_embeddings(vocabulary)
    head = getattr(getattr(model.proposal_source, "model", None), "class_head", None)
    if getattr(head, "text_classifier", None) is not None:
        head.text_classifier(vocabulary)


@torch.no_grad()
def run_once(model, x, vocabulary, timer: Timer, iteration: int, text_names: int):
    """One image through every stage, each under the timer. Returns the number of crops."""
    with timer("proposals"):
        proposals = model.generate_proposals([x], vocabulary)
    images = model.rgb_images([x])
    with timer("crop_prep"):
        crops, crop_masks, valid = model.prepare_crops(images, [p.masks for p in proposals])
    with timer("clip"):
        embeds = model.encode_crops(crops, crop_masks)
    fresh = [f"new name {iteration} {i}" for i in range(text_names)]  # never encoded: no cache hit
    with timer("text_uncached"):
        model.text_embeddings(fresh)
    with timer("text_cached"):
        text = model.text_embeddings(vocabulary)
    with timer("fusion"):
        clip_probs = model.clip_probabilities(embeds, text, valid)
        size = tuple(x["image"].shape[-2:])
        thing_ids = list(range(len(vocabulary)))
        model.fuse(proposals[0], clip_probs[0], valid[0], size, thing_ids)
    return int(crops.shape[0])


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(args.proposals), *args.opts])
    cfg.freeze()
    threads = set_num_threads(cfg.RUNTIME.NUM_THREADS)
    width, height = (int(v) for v in args.size.lower().split("x"))
    rss_before_build = peak_rss_mib()
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    model.semantic_on = model.panoptic_on = True
    device = model.device
    vocabulary = with_background_name(
        [f"class {i}" for i in range(args.vocabulary_size)], model.background_name
    )
    gen = torch.Generator().manual_seed(0)
    x = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)}
    timer = Timer(device)
    warm_text_caches(model, vocabulary)
    for i in range(args.warmup):
        run_once(model, x, vocabulary, Timer(device), -1 - i, args.text_names)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mib()
    crops = [run_once(model, x, vocabulary, timer, i, args.text_names) for i in range(args.iters)]
    ms = {k: sum(v) / len(v) for k, v in timer.ms.items()}
    pipeline = sum(ms[k] for k in STAGES if k != "text_uncached")
    result = {
        "config": args.config_file,
        "device": str(device),
        "threads": threads,
        "image": f"{width}x{height}",
        "proposals": args.proposals,
        "crops_encoded": crops[-1],
        "vocabulary": len(vocabulary),
        "ms_per_image": {k: round(ms[k], 1) for k in STAGES},
        "text_uncached_names": args.text_names,
        "text_ms_per_new_name": round(ms["text_uncached"] / max(1, args.text_names), 2),
        "ms_total_cached_text": round(pipeline, 1),
        "clip_params_M": round(
            sum(p.numel() for p in model.crop_classifier.clip.parameters()) / 1e6, 2
        ),
        "proposal_params_M": round(
            sum(p.numel() for p in model.proposal_source.parameters()) / 1e6, 2
        ),
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["rss_growth_during_runs_mib"] = round(peak_rss_mib() - rss_before, 1)
    result["rss_before_build_mib"] = round(rss_before_build, 1)
    for k in STAGES:
        print(f"{k:>14s}: {ms[k]:9.1f} ms/image")
    print(f"{'total':>14s}: {pipeline:9.1f} ms/image (text from the cache)")
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
