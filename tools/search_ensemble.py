#!/usr/bin/env python
"""Grid search of the two-stage model's ensemble weight λ × ``MODEL.CLIP.MASK_THR`` on an evaluation
set.

Per image the proposals are computed once and the CLIP scores once per mask threshold; every (λ,
MASK_THR) pair is then re-scored from these and accumulated into its own confusion matrix
(detectron2's semantic segmentation convention, ignore pixels skipped). Prints a table per metric
and the best pair, and writes ``search.json``. Progress is saved every ``--save-every`` images
(atomically) and resumed with ``--resume``. With ``--holdout`` the images of a second, disjoint
range are scored too: the best pair is picked on ``--subset`` and every pair is also reported on the
held-out images, so the searched ensemble is evaluated on images it was not chosen on; and a 2-fold
cross-validation (pick on one range, score on the other, both ways, pooled) gives held-out numbers
for λ = 0, λ = 1 and the searched pair on every image of both ranges (search.json
'cross_validated').

    python tools/search_ensemble.py --config-file configs/toyworld/two_stage_R18.yaml \\
        --output /tmp/two_stage/search --weights 0:1:0.1 --mask-thrs 0.35,0.4,0.45 --subset 0:150 \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS ... MODEL.CLIP.PRETRAINED ...
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate
from tqdm import tqdm

import ov_seg  # noqa: F401 (registration)
from ov_seg.data import build_dataset_mapper
from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.engine import Trainer
from ov_seg.engine.pipeline import atomic_write_json
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.evaluation.grid_search import (
    TABLE_METRICS,
    add_image_set_arguments,
    cross_validate_cells,
    load_state,
    parse_grid,
    save_state,
    search_key,
)
from ov_seg.evaluation.open_vocab_sem_seg import sem_seg_metrics
from ov_seg.modeling.heads.ensemble import with_background_name
from ov_seg.utils.threads import set_num_threads

logger = logging.getLogger("ov_seg.search_ensemble")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a TwoStageOVSeg config")
    p.add_argument("--output", required=True, help="output directory (search.json, progress state)")
    p.add_argument(
        "--weights",
        type=parse_grid,
        default=parse_grid("0:1:0.1"),
        help="λ grid (a,b,... or a:b:step)",
    )
    p.add_argument(
        "--mask-thrs", type=parse_grid, default=parse_grid("0.35,0.4,0.45"), help="MASK_THR grid"
    )
    add_image_set_arguments(
        p,
        metric="mIoU",
        holdout_help="START:END of held-out images: every pair is also scored there "
        "(search.json 'holdout')",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


class GridScorer:
    """Confusion matrices of every (MASK_THR, λ) pair, filled image by image from cached stage
    outputs."""

    def __init__(
        self,
        model,
        weights: Sequence[float],
        mask_thrs: Sequence[float],
        num_classes: int,
        ignore_label: int,
    ):
        self.model = model
        self.weights = list(weights)
        self.mask_thrs = list(mask_thrs)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        n = num_classes + 1
        # (part, MASK_THR, λ, prediction, ground truth); part 0 = search images, 1 = held-out images
        self.conf = np.zeros((2, len(self.mask_thrs), len(self.weights), n, n), dtype=np.int64)

    @torch.no_grad()
    def add_image(self, x: dict, gt: np.ndarray, part: int = 0) -> None:
        """Score one mapped input against its (H, W) ground truth for every grid point, into the
        confusion matrices of ``part`` (0: search images, 1: held-out images)."""
        model = self.model
        vocabulary = with_background_name(model.input_vocabulary(x), model.background_name)
        if len(vocabulary) != self.num_classes:
            raise ValueError(
                f"vocabulary of {len(vocabulary)} names, dataset of {self.num_classes} classes"
            )
        proposals = model.generate_proposals([x], vocabulary)[0]
        images = model.rgb_images([x])
        text = model.text_embeddings(vocabulary) if max(self.weights) > 0 else None
        size = tuple(x["image"].shape[-2:])
        output_size = (int(x.get("height", size[0])), int(x.get("width", size[1])))
        if tuple(gt.shape) != output_size:
            raise ValueError(
                f"{x.get('file_name')}: ground truth {gt.shape}, output size {output_size}"
            )
        gt = gt.astype(np.int64).copy()
        gt[gt == self.ignore_label] = self.num_classes
        n = self.num_classes + 1
        for t, thr in enumerate(self.mask_thrs):
            clip_probs = valid = None
            if text is not None:
                model.crop_classifier.mask_thr = float(thr)
                crops, crop_masks, valids = model.prepare_crops(images, [proposals.masks])
                embeds = model.encode_crops(crops, crop_masks)
                clip_probs, valid = model.clip_probabilities(embeds, text, valids)[0], valids[0]
            for w, weight in enumerate(self.weights):
                if (
                    weight == 0.0 and t > 0
                ):  # λ = 0 does not depend on MASK_THR (see fix_zero_weight)
                    continue
                out = model.fuse(
                    proposals, clip_probs, valid, output_size, [], ensemble_weight=weight
                )
                pred = out["sem_seg"].argmax(0).cpu().numpy().astype(np.int64)
                self.conf[part, t, w] += np.bincount(
                    n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n
                ).reshape(n, n)

    def fix_zero_weight(self) -> None:
        """λ = 0 rows are only computed at the first threshold: copy them to the others."""
        for w, weight in enumerate(self.weights):
            if weight == 0.0:
                self.conf[:, 1:, w] = self.conf[:, :1, w]


# cross-validated selections: name -> the λ values it may pick (None: any λ of the grid)
CV_SELECTIONS = {"lambda_0": (0.0,), "lambda_1": (1.0,), "searched": None}


def cross_validate(conf, weights, mask_thrs, metric, class_names, seen, unseen) -> dict:
    """2-fold cross-validation over the two image sets (``cross_validate_cells``) of each
    selection: λ = 0 with its best MASK_THR, λ = 1 with its best MASK_THR, the searched (λ,
    MASK_THR).

    Args:
        conf: (2, T, W, K+1, K+1) confusion matrices (set, MASK_THR, λ, prediction, truth).

    Returns:
        {selection: {"picks": [pick on set 0, pick on set 1], metrics of the pooled held-out}}.
    """
    out = {}
    for name, allowed in CV_SELECTIONS.items():
        cells = [
            (t, w)
            for t in range(len(mask_thrs))
            for w, weight in enumerate(weights)
            if allowed is None or weight in allowed
        ]
        if not cells:
            continue
        picks, metrics = cross_validate_cells(
            lambda part, cell: conf[part, cell[0], cell[1]],
            cells,
            metric,
            class_names,
            seen,
            unseen,
            TABLE_METRICS,
        )
        picks = [{"ensemble_weight": weights[w], "mask_thr": mask_thrs[t]} for t, w in picks]
        out[name] = {"picks": picks, **metrics}
    return out


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="ov_seg")
    setup_logger(name="detectron2")
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    set_num_threads(cfg.RUNTIME.NUM_THREADS)
    if any(not 0.0 <= w <= 1.0 for w in args.weights):
        raise SystemExit(f"λ values must lie in [0, 1]: {args.weights}")
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    if not dataset:
        raise SystemExit("no dataset: pass --dataset or set DATASETS.TEST")
    if dataset not in DatasetCatalog.list():
        raise SystemExit(f"unknown dataset {dataset!r}")
    meta = MetadataCatalog.get(dataset)
    class_names = list(meta.get("stuff_classes", None) or [])
    if len(class_names) < 2:
        raise SystemExit(f"dataset {dataset!r} needs stuff_classes with at least 2 names")

    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    model.semantic_on, model.panoptic_on = True, False
    if min(args.weights) < 1.0 and not model.proposal_source.has_class_scores:
        raise SystemExit(
            "this proposal source has no class scores: only λ = 1 is possible (--weights 1)"
        )

    all_dicts = DatasetCatalog.get(dataset)
    dicts = all_dicts[args.subset]
    if not dicts:
        raise SystemExit(f"the subset {args.subset} of {dataset!r} is empty")
    held = []
    if args.holdout is not None:
        held = all_dicts[args.holdout]
        ids = set(range(len(all_dicts)))
        if not held:
            raise SystemExit(f"the holdout {args.holdout} of {dataset!r} is empty")
        if set(sorted(ids)[args.subset]) & set(sorted(ids)[args.holdout]):
            raise SystemExit(f"--subset {args.subset} and --holdout {args.holdout} overlap")
    parts = [0] * len(dicts) + [1] * len(held)
    dicts = dicts + held
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name=dataset)
    ignore_label = int(meta.get("ignore_label", 255))
    scorer = GridScorer(model, args.weights, args.mask_thrs, len(class_names), ignore_label)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "search_state.npz"
    key = search_key(cfg, [args.weights, args.mask_thrs], args, dataset, len(dicts))
    start, scorer.conf = load_state(state_path, key, scorer.conf, args.resume)
    for i in tqdm(
        range(start, len(dicts)), initial=start, total=len(dicts), desc="images", file=sys.stdout
    ):
        d = dicts[i]
        scorer.add_image(mapper(d), read_label_image(d["sem_seg_file_name"]), parts[i])
        if (i + 1) % args.save_every == 0 and i + 1 < len(dicts):
            save_state(state_path, key, i + 1, scorer.conf)
    scorer.fix_zero_weight()
    save_state(state_path, key, len(dicts), scorer.conf)

    seen, unseen = meta.get("seen_class_ids", None), meta.get("unseen_class_ids", None)
    results, holdout = [], []
    for t, thr in enumerate(args.mask_thrs):
        for w, weight in enumerate(args.weights):
            for part, rows in ((0, results), (1, holdout) if held else (None, None)):
                if part is None:
                    continue
                m = sem_seg_metrics(scorer.conf[part, t, w], class_names, seen, unseen)
                rows.append(
                    {
                        "ensemble_weight": weight,
                        "mask_thr": thr,
                        **{k: m[k] for k in TABLE_METRICS if k in m},
                    }
                )
    if args.metric not in results[0]:
        raise SystemExit(f"metric {args.metric!r} not available; known: {sorted(results[0])}")
    best = max(results, key=lambda r: -np.inf if np.isnan(r[args.metric]) else r[args.metric])
    tables = [(results, args.subset, len(parts) - len(held))]
    if held:
        tables.append((holdout, args.holdout, len(held)))
    for grid, subset, num in tables:
        for metric in (k for k in TABLE_METRICS if k in grid[0]):
            rows = [
                [weight]
                + [
                    next(
                        r[metric]
                        for r in grid
                        if r["ensemble_weight"] == weight and r["mask_thr"] == thr
                    )
                    for thr in args.mask_thrs
                ]
                for weight in args.weights
            ]
            print(f"\n{metric} on {dataset} {subset.start}:{subset.stop} ({num} images)")
            print(
                tabulate(
                    rows,
                    headers=["λ \\ MASK_THR"] + [str(t) for t in args.mask_thrs],
                    floatfmt=".2f",
                )
            )
    print(
        f"\nbest by {args.metric}: λ = {best['ensemble_weight']}, MASK_THR = {best['mask_thr']} "
        f"({', '.join(f'{k} {best[k]:.2f}' for k in TABLE_METRICS if k in best)})"
    )
    summary = {
        "dataset": dataset,
        "subset": [args.subset.start, args.subset.stop],
        "num_images": len(parts) - len(held),
        "metric": args.metric,
        "best": best,
        "grid": results,
    }
    if held:
        at = {(r["ensemble_weight"], r["mask_thr"]): r for r in holdout}
        summary["holdout"] = {
            "subset": [args.holdout.start, args.holdout.stop],
            "num_images": len(held),
            "best": at[(best["ensemble_weight"], best["mask_thr"])],
            "grid": holdout,
        }
        print(
            "held-out images at the best pair: "
            + ", ".join(
                f"{k} {summary['holdout']['best'][k]:.2f}" for k in TABLE_METRICS if k in best
            )
        )
        summary["cross_validated"] = cross_validate(
            scorer.conf, args.weights, args.mask_thrs, args.metric, class_names, seen, unseen
        )
        for name, cv in summary["cross_validated"].items():
            picks = "; ".join(
                f"λ {p['ensemble_weight']}, MASK_THR {p['mask_thr']}" for p in cv["picks"]
            )
            print(
                f"2-fold cross-validated {name} (picks {picks}): "
                + ", ".join(f"{k} {cv[k]:.2f}" for k in TABLE_METRICS if k in cv)
            )
    atomic_write_json(out_dir / "search.json", summary)
    return best


if __name__ == "__main__":
    main()
