"""The two-stage model's benchmark (``tools/benchmark.py two-stage``): per-stage times read from the
model's own ``StageTimer``, crops/s, CLIP GFLOP/s as a fraction of a matmul measured in the same
run, text encoding (cold / disk cache / memory), peak RSS and the foreign CPU load; or
(``memory_benchmark``) seconds per photo and peak RSS of photos through the demo's predictor.

Stages (median of ``iters`` runs after ``warmup``): ``proposals`` (the proposal source), ``select``
(objectness skip + duplicate grouping), ``crop_prep`` (masked crops; 0 in single-pass mode),
``clip`` (image tower), ``text`` (the vocabulary from the memory cache), ``fusion`` (ensemble,
semantic + panoptic outputs), each recorded by the model's own ``inference`` (no copy of the
forward here). ``end_to_end`` is the median over runs of their sum.

With random weights the proposal masks are meaningless (often near-identical full-image masks, which
the exact duplicate sharing would collapse to one crop), so ``synthetic_masks="auto"`` gives a
model without ``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS`` / ``MODEL.WEIGHTS`` Q distinct random blob masks
and uniform random objectness in place of its proposals, after the proposal stage is timed.
"""

import copy
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from torch.utils.flop_counter import FlopCounterMode

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

from .machine import LoadMonitor, peak_rss_mib, random_blobs
from .stats import fraction_of_peak, gflops_per_s, matmul_gflops, rate, share, weighted_flops

__all__ = [
    "STAGES",
    "benchmark_two_stage",
    "build_two_stage",
    "clip_flops_per_crop",
    "memory_benchmark",
    "run_once",
    "text_classifiers",
]

STAGES = ("proposals", "select", "crop_prep", "clip", "text", "fusion")
COUNTS = ("proposals_kept", "masks_encoded", "crops_encoded", "crops_by_size")


def _quiet(_: str) -> None:
    pass


def build_two_stage(config_file: str, proposals: int, opts: Sequence[str] = (), threads: int = 0):
    """The config (+ ``NUM_OBJECT_QUERIES proposals`` and ``opts``) and its model in eval mode, with
    semantic and panoptic outputs on and ``MODEL.WEIGHTS`` loaded when given.

    Returns:
        (cfg, model, torch threads set (``threads``, 0 = RUNTIME.NUM_THREADS), build seconds).
    """
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(proposals), *opts])
    cfg.freeze()
    threads = set_num_threads(threads if threads > 0 else cfg.RUNTIME.NUM_THREADS)
    t0 = time.perf_counter()
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    model.semantic_on = model.panoptic_on = True
    return cfg, model, threads, time.perf_counter() - t0


def text_classifiers(model) -> list:
    """The model's text classifiers: the CLIP branch's and the proposal head's, where it has one."""
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
    return ms, {k: timer.counts.get(k, 0) for k in COUNTS}


def make_plain(model) -> None:
    """Turn off every exact speed-up of ``model`` (the reference path of the benchmark); the
    duplicate sharing is turned off in the run's options (``benchmark_two_stage``)."""
    classifiers = text_classifiers(model)
    for tc in classifiers:
        tc.trim_context = False
        tc.disk_cache = None
    for tc in classifiers[1:]:  # own caches again: the vocabulary is encoded by each classifier
        tc._cache, tc._name_cache, tc._weights_hash = OrderedDict(), {}, {"value": None}
    model.crop_classifier.resampler = "roi_align"


def memory_benchmark(
    cfg,
    model,
    sizes: Sequence[str],
    vocabulary_size: int = 0,
    iters: int = 5,
    warmup: int = 1,
    log: Callable[[str], None] = _quiet,
) -> Dict[str, object]:
    """Random photos of ``sizes`` ("WxH") through ``OVSegPredictor`` + its label map, as the demo
    runs them (drawing left out): median seconds per photo (after ``warmup`` runs, which also
    encode the names) and the process's peak RSS. Names: the first ``vocabulary_size`` of
    ADE20K-847 (0: all), 'class i' beyond."""
    count = vocabulary_size or len(ADE20K_847_CLASSES)
    names = list(ADE20K_847_CLASSES[:count])
    names += [f"class {i}" for i in range(len(names), count)]
    predictor = OVSegPredictor(cfg, model)
    gen = np.random.default_rng(0)
    result: Dict[str, object] = {
        "names": len(names),
        "memory_budget_mb": cfg.TEST.MEMORY_BUDGET_MB,
        "photos": {},
    }
    for size in sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        image = gen.integers(0, 256, (height, width, 3), dtype=np.uint8)
        times, kind = [], ""
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            out = predictor(image, names)
            labels, _ = OVSegPredictor.labels(out)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            kind = "labels" if out["sem_seg"].dim() == 2 else "dense scores"
            del out, labels
        result["photos"][size] = {
            "megapixels": round(width * height / 1e6, 2),
            "s_per_photo": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "sem_seg": kind,
        }
        log(f"{size}: {statistics.median(times):.3f} s/photo ({kind})")
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _text_timings(model, vocabulary, grad_mode, plain, skip_text, text_cache_dir) -> dict:
    """cold (empty caches), from the disk cache (memory caches cleared; the hash of the text
    tower's weights included), from memory."""
    out = {}
    if plain and not skip_text:
        out["text_cold_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
    elif not skip_text:
        from ov_seg.modeling.clip.text_cache import TextEmbeddingCache

        with tempfile.TemporaryDirectory() as tmp:
            for tc in text_classifiers(model):
                tc.disk_cache = TextEmbeddingCache(text_cache_dir or tmp)
                tc.clear_cache()
            out["text_cold_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
            for tc in text_classifiers(model):
                tc.clear_cache()  # memory only: the hash is recomputed, the files stay
            out["text_disk_s"] = round(encode_vocabulary(model, vocabulary, grad_mode), 3)
    else:
        encode_vocabulary(model, vocabulary, grad_mode)
    out["text_memory_ms"] = round(1e3 * encode_vocabulary(model, vocabulary, grad_mode), 3)
    return out


def benchmark_two_stage(
    cfg,
    model,
    size: Tuple[int, int] = (683, 512),
    vocabulary_size: int = 0,
    iters: int = 5,
    warmup: int = 1,
    synthetic_masks: str = "auto",
    text_cache_dir: str = "",
    skip_text: bool = False,
    plain: bool = False,
    text_only: bool = False,
    shared_prefix: bool = True,
    log: Callable[[str], None] = _quiet,
) -> Dict[str, object]:
    """Stage times, counts, FLOPs and text timings of one random image of ``size`` (W, H: the model
    input, no resize) through a model of ``build_two_stage`` (see the module docstring).

    Args:
        vocabulary_size: synthetic names 'class i' (0: the config's test dataset's stuff_classes).
        synthetic_masks: "yes" / "no" / "auto" (yes without trained weights).
        plain: the reference path (context 77, unshared text caches, roi_align crops, no duplicate
            sharing, no_grad).
        text_only: only the text timings, no stage runs.
        shared_prefix: the text classifiers' ``share_prefix``.
    """
    device = model.device
    q = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    if plain:
        make_plain(model)
    for tc in text_classifiers(model):
        tc.share_prefix = shared_prefix
    grad_mode = torch.no_grad if plain else torch.inference_mode
    width, height = size
    if vocabulary_size > 0:
        names = [f"class {i}" for i in range(vocabulary_size)]
    else:
        names = list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_classes)
    vocabulary = with_background_name(names, model.background_name)
    trained = bool(cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS or cfg.MODEL.WEIGHTS)
    use_synthetic = synthetic_masks == "yes" or (synthetic_masks == "auto" and not trained)
    gen = torch.Generator().manual_seed(0)
    x = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)}
    synthetic = None
    if use_synthetic:
        synthetic = Proposals(
            random_blobs(q, height, width, gen).to(device),
            torch.rand(q, generator=gen).to(device),
            None,
        )
    peak_before = matmul_gflops()
    result: Dict[str, object] = {
        "device": str(device),
        "image": f"{width}x{height}",
        "proposals": q,
        "synthetic_masks": use_synthetic,
        "plain": plain,
        "vocabulary": len(vocabulary),
        "fast": {k: v for k, v in cfg.MODEL.TWO_STAGE.FAST.items()},
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
    templates = model.crop_classifier.text_classifier.templates
    result["text_prompts"] = len(vocabulary) * len(templates)
    result.update(_text_timings(model, vocabulary, grad_mode, plain, skip_text, text_cache_dir))
    result["text_shared_prefix"] = shared_prefix
    if text_only:
        return result

    model.prepare_fast_modes()  # quantization (after every weight is loaded)
    options = model.default_options.replace(vocabulary=tuple(vocabulary))
    if plain:  # no duplicate sharing either
        options = options.replace(fast=options.fast.replace(duplicate_iou=1.01))
    with grad_mode():
        single_pass_flops = None
        if model.clip_mode == "single_pass" and model.quantize == "none":
            single_pass_flops = single_pass_flops_of(model, x, vocabulary, synthetic)
        for _ in range(warmup):
            run_once(model, x, options, synthetic)
        monitor = LoadMonitor().start()
        runs = []
        for i in range(iters):
            ms, counts = run_once(model, x, options, synthetic)
            runs.append(ms)
            log(f"run {i + 1}/{iters} (ms): " + ", ".join(f"{k} {ms[k]:.0f}" for k in STAGES))
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
        result["clip_flops_per_crop"] = dict(flops_crop)
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
    return result
