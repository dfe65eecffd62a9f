#!/usr/bin/env python
"""Benchmark the two-stage model (any MODEL.TWO_STAGE.FAST mode): per-stage times, crops/s, CLIP
GFLOP/s as a fraction of a matmul measured in the same run, text encoding (cold / disk cache /
memory), peak RSS and the foreign CPU load during the run. JSON output.

    python tools/benchmark.py --config-file configs/two_stage/R101c_vitB16_ade150.yaml \\
        --size 683x512 --proposals 100 --json out.json MODEL.CLIP.PRETRAINED ""

    python tools/benchmark.py --config-file configs/toyworld/two_stage_R18.yaml --size 64x64 \\
        --proposals 16 MODEL.TWO_STAGE.FAST.CLIP_MODE single_pass

Random weights unless the config / opts give some; one random image of ``--size`` (W x H, the model
input: no resize). With random weights the proposal masks are meaningless (often near-identical
full-image masks, which the exact duplicate sharing would collapse to one crop), so by default
(``--synthetic-masks auto``) a model without ``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS`` /
``MODEL.WEIGHTS`` gets Q distinct random blob masks (5-30 % of the image side) and uniform random
objectness in place of its proposals, after the proposal stage is timed: the CLIP stage then
encodes Q distinct crops.

Stages (median of ``--iters`` runs after ``--warmup``): ``proposals`` (the proposal source),
``select`` (objectness skip + duplicate grouping), ``crop_prep`` (masked crops; 0 in single-pass
mode), ``clip`` (image tower), ``text`` (the vocabulary from the memory cache), ``fusion``
(ensemble, semantic + panoptic outputs), each recorded by the model's own ``inference`` into a
``StageTimer`` (no copy of the forward here). ``end_to_end`` is the median over runs of their sum.

Text (once, before the stage runs): ``text_cold_s`` encodes the vocabulary with empty caches (in
every text classifier of the model: the CLIP branch's and the proposal head's, which share their
cache when they can), ``text_disk_s`` again from the on-disk cache only (memory caches cleared;
the hash of the text tower's weights included), ``text_memory_ms`` from memory.

Machine: the fp32 matmul throughput (n x n, best of 5) with the run's threads, before and after
the runs; CLIP FLOPs counted by ``torch.utils.flop_counter`` on the float model (nominal FLOPs,
also for int8); ``foreign_cpu_cores``: CPU time of other processes during the timed runs, in cores
(from /proc/stat minus this process's CPU time), and the load averages.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from torch.utils.flop_counter import FlopCounterMode

import ov_seg  # noqa: F401 (registration)
from ov_seg.benchmark.stats import (
    busy_cpu_s_from_proc_stat,
    foreign_cpu_cores,
    fraction_of_peak,
    gflops_per_s,
    matmul_gflops,
    rate,
    share,
    weighted_flops,
)
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.data.datasets.register_ade20k_full import ADE20K_847_CLASSES
from ov_seg.engine import Trainer
from ov_seg.engine.predictor import OVSegPredictor
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.clip import MaskPromptVisionEncoder, normalize_clip
from ov_seg.modeling.clip.quantize import replace_self_attention
from ov_seg.modeling.fusion import with_background_name
from ov_seg.modeling.meta_arch.base import StageTimer
from ov_seg.modeling.proposal_sources import Proposals
from ov_seg.utils.threads import set_num_threads

STAGES = ("proposals", "select", "crop_prep", "clip", "text", "fusion")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a TwoStageOVSeg config")
    p.add_argument("--size", default="683x512", help="model input W x H")
    p.add_argument(
        "--proposals", type=int, default=100, help="MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"
    )
    p.add_argument(
        "--vocabulary-size",
        type=int,
        default=0,
        help="synthetic names 'class i' (0 = the config's test dataset's stuff_classes)",
    )
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--synthetic-masks",
        choices=("auto", "yes", "no"),
        default="auto",
        help="replace the proposals by distinct random blobs (auto: when no trained weights)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = RUNTIME.NUM_THREADS)")
    p.add_argument("--text-cache-dir", default="", help="disk cache for the text timings (temp)")
    p.add_argument("--skip-text", action="store_true", help="no cold / disk text timings")
    p.add_argument(
        "--plain",
        action="store_true",
        help="disable the exact speed-ups (context 77, unshared text caches, roi_align crops, no "
        "duplicate sharing, no_grad): the reference path",
    )
    p.add_argument(
        "--memory",
        default="",
        metavar="WxH[,WxH...]",
        help="instead of the stage timings: photos of these sizes through the demo's predictor "
        "(test resize, full-resolution labels and panoptic output within TEST.MEMORY_BUDGET_MB): "
        "seconds per photo and peak RSS; names from ADE20K-847 (--vocabulary-size of them)",
    )
    p.add_argument(
        "--text-only",
        action="store_true",
        help="only the text timings (cold / disk / memory), no stage runs",
    )
    p.add_argument(
        "--no-shared-prefix",
        action="store_true",
        help="encode every prompt whole (TextClassifier share_prefix off): the text path before "
        "the shared-prefix speed-up",
    )
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--json", default="", help="write the result to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


# ---------------------------------------------------------------------------- machine
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> Optional[float]:
    """CPU seconds all processes of the machine spent busy (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            return busy_cpu_s_from_proc_stat(f.readline(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None


class LoadMonitor:
    """Foreign CPU load between ``start()`` and ``stop()``: busy CPU seconds of the machine minus
    this process's, per wall second (in cores)."""

    def start(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()
        self.load0 = os.getloadavg()
        return self

    def stop(self) -> Dict[str, object]:
        wall = time.perf_counter() - self.t0
        busy, own = machine_busy_s(), own_cpu_s() - self.own0
        out = {
            "wall_s": round(wall, 2),
            "own_cpu_cores": round(own / wall, 2),
            "loadavg_before": [round(v, 2) for v in self.load0],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        }
        if busy is not None and self.busy0 is not None:
            out["foreign_cpu_cores"] = round(foreign_cpu_cores(busy - self.busy0, own, wall), 2)
        return out


# ---------------------------------------------------------------------------- model
def random_blobs(q: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(q, H, W) soft elliptic blobs, radii 5-30 % of the longer side, random centres."""
    yy = torch.arange(height).float().view(1, -1, 1)
    xx = torch.arange(width).float().view(1, 1, -1)
    side = max(height, width)
    c = torch.rand(q, 2, generator=generator) * torch.tensor([width, height])
    r = (0.05 + 0.25 * torch.rand(q, 2, generator=generator)) * side
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
        (yy - c[:, 1, None, None]) / r[:, 1, None, None]
    ) ** 2
    return torch.sigmoid(4 * (1 - d))


def text_classifiers(model) -> list:
    out = [model.crop_classifier.text_classifier]
    head = getattr(getattr(model.proposal_source, "model", None), "class_head", None)
    if getattr(head, "text_classifier", None) is not None:
        out.append(head.text_classifier)
    return out


def encode_vocabulary(model, vocabulary, grad_mode=torch.inference_mode) -> float:
    """Seconds to get the vocabulary's embeddings in every text classifier."""
    t0 = time.perf_counter()
    with grad_mode():
        for tc in text_classifiers(model):
            tc(vocabulary)
    return time.perf_counter() - t0


def clip_flops_per_crop(model, size: int, executed: bool = False) -> float:
    """FLOPs of one masked crop through the image tower (float model, mask prompts): nominal (the
    whole tower, every token through every block) or ``executed`` (what the crop path runs: with
    class-token pooling its last block computes the class token only).

    Counted on a copy whose attention is ``LinearSelfAttention`` (same FLOPs): the flop counter
    does not see inside ``nn.MultiheadAttention``'s fused inference path (its projections would be
    missing, ~1/3 of a ViT's FLOPs); the class-token-only last block keeps its
    ``nn.MultiheadAttention``, whose query / key-value path the counter sees."""
    source = model.crop_classifier.encoder
    visual = copy.deepcopy(source.visual)
    # a quantized tower (applied at the first forward) keeps every token in its last block
    quantized = getattr(model, "quantize", "none") != "none"
    cls_only = executed and source.class_token_only() and not quantized
    last_attn = visual.transformer.resblocks[-1].attn
    replace_self_attention(visual)
    if cls_only:
        visual.transformer.resblocks[-1].attn = last_attn
    enc = MaskPromptVisionEncoder(
        visual,
        source.depth,
        prompts=None if source.prompts is None else source.prompts.data,
        register_visual=False,
    )
    crops = torch.zeros(2, 3, size, size, device=model.device)
    masks = torch.zeros(2, size, size, dtype=torch.bool, device=model.device)
    masks[:, : size // 2] = True  # half the patches get prompts, as masked crops do
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        enc(crops, masks, need_tokens=not cls_only)
    return counter.get_total_flops() / 2


def single_pass_flops_of(model, x, vocabulary, synthetic: Optional[Proposals]) -> float:
    """Nominal FLOPs of the single-pass CLIP stage of one image (attention swapped for
    ``LinearSelfAttention`` on a copy, so that the counter sees the projections)."""
    proposals = model.generate_proposals([x], vocabulary)
    if synthetic is not None:
        proposals = [synthetic]
    p = model.select_proposals(proposals[0])
    embedder = copy.copy(model.single_pass)
    visual = copy.deepcopy(model.single_pass.visual)
    replace_self_attention(visual)
    object.__setattr__(embedder, "visual", visual)
    binary = p.masks > model.crop_classifier.mask_thr
    binary = binary[binary.flatten(1).any(dim=1)]
    image = normalize_clip(model.rgb_images([x])[0])
    with FlopCounterMode(display=False) as counter:
        embedder(image, binary)
    return counter.get_total_flops()


def run_once(model, x, options, synthetic: Optional[Proposals]) -> Tuple[dict, dict]:
    """One image through ``model.inference`` with a ``StageTimer`` that the model's own stages
    record into; ``synthetic`` proposals replace the proposal source's output (a forward hook: the
    source still runs and is timed).

    Returns:
        ({stage: ms}, the stage counts: proposals kept, masks and crops encoded, crops per size).
    """
    timer = StageTimer(model.device)
    hook = None
    if synthetic is not None:
        hook = model.proposal_source.register_forward_hook(
            lambda module, args, out: [synthetic._replace(class_probs=out[0].class_probs)]
        )
    try:
        model.inference([x], options, timer)
    finally:
        if hook is not None:
            hook.remove()
    ms = {k: sum(timer.ms.get(k, [])) for k in STAGES}  # a stage may run in several parts
    keys = ("proposals_kept", "masks_encoded", "crops_encoded", "crops_by_size")
    return ms, {k: timer.counts.get(k, 0) for k in keys}


def make_plain(model) -> None:
    """Turn off every exact speed-up of ``model`` (the reference path of the benchmark); the
    duplicate sharing is turned off in the run's options (``main``)."""
    classifiers = text_classifiers(model)
    for tc in classifiers:
        tc.trim_context = False
        tc.disk_cache = None
    for tc in classifiers[1:]:  # own caches again: the vocabulary is encoded by each classifier
        tc._cache, tc._name_cache, tc._weights_hash = OrderedDict(), {}, {"value": None}
    model.crop_classifier.resampler = "roi_align"


def build(args):
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(args.proposals), *args.opts])
    cfg.freeze()
    threads = args.threads if args.threads > 0 else cfg.RUNTIME.NUM_THREADS
    threads = set_num_threads(threads)
    t0 = time.perf_counter()
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    model.semantic_on = model.panoptic_on = True
    return cfg, model, threads, time.perf_counter() - t0


def memory_benchmark(args, cfg, model, threads: int) -> Dict[str, object]:
    """Photos of the ``--memory`` sizes through ``OVSegPredictor`` + its label map, as the demo
    runs them (drawing left out): median seconds per photo (after ``--warmup`` runs, which also
    encode the names) and the process's peak RSS."""
    count = args.vocabulary_size or len(ADE20K_847_CLASSES)
    names = list(ADE20K_847_CLASSES[:count])
    names += [f"class {i}" for i in range(len(names), count)]
    predictor = OVSegPredictor(cfg, model)
    gen = np.random.default_rng(0)
    result: Dict[str, object] = {
        "label": args.label,
        "config": args.config_file,
        "opts": args.opts,
        "threads": threads,
        "names": len(names),
        "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        "photos": {},
    }
    for size in args.memory.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        image = gen.integers(0, 256, (height, width, 3), dtype=np.uint8)
        times, kind = [], ""
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            out = predictor(image, names)
            labels, _ = OVSegPredictor.labels(out)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            kind = "labels" if out["sem_seg"].dim() == 2 else "dense scores"
            del out, labels
        result["photos"][size] = {
            "megapixels": round(width * height / 1e6, 2),
            "s_per_photo": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "sem_seg": kind,
        }
        print(f"{size}: {statistics.median(times):.3f} s/photo ({kind})", flush=True)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(result, indent=2))
    return result


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg, model, threads, build_s = build(args)
    if args.memory:
        return memory_benchmark(args, cfg, model, threads)
    device = model.device
    if args.plain:
        make_plain(model)
    for tc in text_classifiers(model):
        tc.share_prefix = not args.no_shared_prefix
    grad_mode = torch.no_grad if args.plain else torch.inference_mode
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.vocabulary_size > 0:
        names = [f"class {i}" for i in range(args.vocabulary_size)]
    else:
        names = list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_classes)
    vocabulary = with_background_name(names, model.background_name)
    trained = bool(cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS or cfg.MODEL.WEIGHTS)
    synthetic_masks = args.synthetic_masks == "yes" or (
        args.synthetic_masks == "auto" and not trained
    )
    gen = torch.Generator().manual_seed(0)
    x = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)}
    synthetic = None
    if synthetic_masks:
        synthetic = Proposals(
            random_blobs(args.proposals, height, width, gen).to(device),
            torch.rand(args.proposals, generator=gen).to(device),
            None,
        )
    peak_before = matmul_gflops()
    result: Dict[str, object] = {
        "label": args.label,
        "config": args.config_file,
        "opts": args.opts,
        "device": str(device),
        "threads": threads,
        "image": f"{width}x{height}",
        "proposals": args.proposals,
        "synthetic_masks": synthetic_masks,
        "plain": args.plain,
        "vocabulary": len(vocabulary),
        "fast": {k: v for k, v in cfg.MODEL.TWO_STAGE.FAST.items()},
        "build_s": round(build_s, 2),
        "clip_params_M": round(
            sum(p.numel() for p in model.crop_classifier.clip.parameters()) / 1e6, 2
        ),
    }
    # per crop size (the full-size crops of FULL_SIZE_CROPS too): nominal and executed FLOPs
    sizes = {model.crop_classifier.crop_size, model.full_crop_size}
    flops_crop = executed_crop = None
    if model.clip_mode == "crops":
        flops_crop = {s: clip_flops_per_crop(model, s) for s in sizes}
        executed_crop = {s: clip_flops_per_crop(model, s, executed=True) for s in sizes}

    # text: cold (empty caches), from the disk cache, from memory
    templates = model.crop_classifier.text_classifier.templates
    result["text_prompts"] = len(vocabulary) * len(templates)
    if args.plain and not args.skip_text:
        result["text_cold_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
    elif not args.skip_text:
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = args.text_cache_dir or tmp
            from ov_seg.modeling.clip.text_cache import TextEmbeddingCache

            for tc in text_classifiers(model):
                tc.disk_cache = TextEmbeddingCache(cache_dir)
                tc.clear_cache()
            result["text_cold_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
            for tc in text_classifiers(model):
                tc.clear_cache()  # memory only: the hash is recomputed, the files stay
            result["text_disk_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
    else:
        encode_vocabulary(model, vocabulary, grad_mode)
    result["text_memory_ms"] = round(1e3 * encode_vocabulary(model, vocabulary, grad_mode), 3)
    result["text_shared_prefix"] = not args.no_shared_prefix
    if args.text_only:
        print(json.dumps(result, indent=2))
        return result

    model.prepare_fast_modes()  # quantization (after every weight is loaded)
    options = model.default_options.replace(vocabulary=tuple(vocabulary))
    if args.plain:  # no duplicate sharing either
        options = options.replace(fast=options.fast.replace(duplicate_iou=1.01))
    with grad_mode():
        single_pass_flops = None
        if model.clip_mode == "single_pass" and model.quantize == "none":
            single_pass_flops = single_pass_flops_of(model, x, vocabulary, synthetic)
        for _ in range(args.warmup):
            run_once(model, x, options, synthetic)
        monitor = LoadMonitor().start()
        runs = []
        for i in range(args.iters):
            ms, counts = run_once(model, x, options, synthetic)
            runs.append(ms)
            stages = ", ".join(f"{k} {ms[k]:.0f}" for k in STAGES)
            print(f"run {i + 1}/{args.iters} (ms): {stages}", flush=True)
        load = monitor.stop()
    peak_after = matmul_gflops()
    med = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    totals = [sum(r[k] for k in STAGES) for r in runs]
    clip_s = med["clip"] / 1e3
    peak = max(peak_before, peak_after)
    result.update(counts)
    result["ms_per_image"] = {k: round(med[k], 1) for k in STAGES}
    result["end_to_end_ms"] = round(statistics.median(totals), 1)
    result["end_to_end_runs_ms"] = [round(t, 1) for t in totals]
    result["crop_prep_fraction_of_clip"] = round(share(med["crop_prep"], med["clip"]), 4)
    result["crops_per_s"] = round(rate(counts["crops_encoded"], clip_s + med["crop_prep"] / 1e3), 2)
    result["matmul_gflops_per_s"] = {"before": round(peak_before, 1), "after": round(peak_after, 1)}
    if flops_crop is not None:
        gflop = weighted_flops(flops_crop, counts["crops_by_size"]) / 1e9
    elif single_pass_flops is not None:
        gflop = single_pass_flops / 1e9
    else:
        gflop = None
    if gflop is not None:
        result["clip_gflop"] = round(gflop, 2)
        result["clip_gflops_per_s"] = round(gflops_per_s(gflop * 1e9, clip_s), 1)
        result["clip_fraction_of_matmul"] = round(
            fraction_of_peak(gflops_per_s(gflop * 1e9, clip_s), peak), 3
        )
    if executed_crop is not None:
        # the FLOPs that actually ran (nominal ones above: the whole tower, the convention)
        executed = weighted_flops(executed_crop, counts["crops_by_size"]) / 1e9
        result["clip_executed_gflop"] = round(executed, 2)
        result["clip_executed_fraction_of_matmul"] = round(
            fraction_of_peak(gflops_per_s(executed * 1e9, clip_s), peak), 3
        )
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["load"] = load
    for k in STAGES:
        print(f"{k:>12s}: {med[k]:10.1f} ms/image")
    print(f"{'end_to_end':>12s}: {result['end_to_end_ms']:10.1f} ms/image (text from the cache)")
    print(json.dumps(result, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
