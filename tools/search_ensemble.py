#!/usr/bin/env python
"""Grid search of the two-stage model's ensemble weight λ × ``MODEL.CLIP.MASK_THR`` (× the
seen-class calibration γ, ``MODEL.SEEN_CALIBRATION.GAMMA``, with ``--gammas``; × the seen names' own
ensemble weight λ_s, ``MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT``, with ``--seen-weights``) on an
evaluation set.

Per image the proposals are computed once and the CLIP scores once per mask threshold; every (λ,
MASK_THR, γ) cell is then re-scored from these and accumulated into its own confusion matrix
(detectron2's semantic segmentation convention, ignore pixels skipped). Prints a table per metric
and the best pair, and writes ``search.json``. Progress is saved every ``--save-every`` images
(atomically) and resumed with ``--resume``. With ``--holdout`` the images of a second, disjoint
range are scored too: the best pair is picked on ``--subset`` and every pair is also reported on the
held-out images, so the searched ensemble is evaluated on images it was not chosen on; and a 2-fold
cross-validation (pick on one range, score on the other, both ways, pooled) gives held-out numbers
for λ = 0, λ = 1 and the searched ensemble (0 < λ < 1, λ_s searched too) on every image of both
ranges (search.json 'cross_validated'), uncalibrated (γ = 0) and, when the γ grid has values > 0,
with γ searched too (the '_calibrated' selections); with ``--seen-weights`` also the uniform
ensemble (λ_s = λ, the '_uniform' selections). The model's fast modes (``MODEL.TWO_STAGE.FAST``:
proposal selection, near-duplicate sharing, smaller crops, single pass, int8) run as in its
forward, so a fast mode's λ, MASK_THR and γ are searched and cross-validated the same way as the
exact mode's.

    python tools/search_ensemble.py --config-file configs/toyworld/two_stage_R18.yaml \\
        --output /tmp/two_stage/search --weights 0:1:0.1 --mask-thrs 0.35,0.4,0.45 --subset 0:150 \\
        MODEL.TWO_STAGE.PROPOSAL_WEIGHTS ... MODEL.CLIP.PRETRAINED ...
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate
from tqdm import tqdm

import ov_seg  # noqa: F401 (registration)
from ov_seg.checkpoint import SafeCheckpointer
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
from ov_seg.utils.semseg import label_map
from ov_seg.utils.threads import set_num_threads

logger = logging.getLogger("ov_seg.search_ensemble")

# one fusion of the grid: (λ, λ_s), λ_s = None for the uniform ensemble
Fusion = Tuple[float, Optional[float]]


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
    p.add_argument(
        "--seen-weights",
        type=parse_grid,
        default=[],
        help="grid of λ_s, the CLIP exponent of the names the proposal head was trained on, tried "
        "with every ensemble λ (0 < λ < 1) besides λ_s = λ (default: none, the uniform ensemble)",
    )
    p.add_argument(
        "--gammas",
        type=parse_grid,
        default=parse_grid("0"),
        help="seen-class calibration γ grid (logit units; must contain 0, the plain model)",
    )
    add_image_set_arguments(
        p,
        metric="mIoU",
        holdout_help="START:END of held-out images: every pair is also scored there "
        "(search.json 'holdout')",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def fusion_grid(weights: Sequence[float], seen_weights: Sequence[float] = ()) -> List[Fusion]:
    """The (λ, λ_s) pairs of a search: every λ with λ_s = None (the uniform ensemble), and every
    ensemble λ (0 < λ < 1) with each other λ_s of ``seen_weights``."""
    out = []
    for weight in weights:
        out.append((float(weight), None))
        if 0.0 < weight < 1.0:
            out += [(float(weight), float(s)) for s in seen_weights if s != weight]
    return out


class GridScorer:
    """Confusion matrices of every (MASK_THR, γ, (λ, λ_s)) cell, filled image by image from cached
    stage outputs."""

    def __init__(
        self,
        model,
        fusions: Sequence[Fusion],
        mask_thrs: Sequence[float],
        num_classes: int,
        ignore_label: int,
        gammas: Sequence[float] = (0.0,),
    ):
        self.model = model
        self.fusions = list(fusions)
        self.mask_thrs = list(mask_thrs)
        self.gammas = list(gammas)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        # the options of every grid point (validated here: γ > 0 without seen names fails)
        base = model.default_options
        self.options = [
            [
                [base.replace(mask_thr=float(t), seen_gamma=float(g), ensemble_weight=float(w),
                              seen_ensemble_weight=s)
                 for w, s in self.fusions]
                for g in self.gammas
            ]
            for t in self.mask_thrs
        ]  # fmt: skip
        for g in self.gammas:
            model.calibration(base.replace(seen_gamma=float(g)))
        n = num_classes + 1
        # (part, MASK_THR, γ, (λ, λ_s), prediction, ground truth); part 0 = search images, 1 =
        # held-out
        self.conf = np.zeros(
            (2, len(self.mask_thrs), len(self.gammas), len(self.fusions), n, n), dtype=np.int64
        )

    @torch.inference_mode()
    def add_image(self, x: dict, gt: np.ndarray, part: int = 0) -> None:
        """Score one mapped input against its (H, W) ground truth for every grid point, into the
        confusion matrices of ``part`` (0: search images, 1: held-out images)."""
        model = self.model
        vocabulary = model.vocabulary(x)
        if len(vocabulary) != self.num_classes:
            raise ValueError(
                f"vocabulary of {len(vocabulary)} names, dataset of {self.num_classes} classes"
            )
        size = tuple(x["image"].shape[-2:])
        output_size = (int(x.get("height", size[0])), int(x.get("width", size[1])))
        if tuple(gt.shape) != output_size:
            raise ValueError(
                f"{x.get('file_name')}: ground truth {gt.shape}, output size {output_size}"
            )
        gt = gt.astype(np.int64).copy()
        gt[gt == self.ignore_label] = self.num_classes
        n = self.num_classes + 1
        # the model's own stages, fast modes (MODEL.TWO_STAGE.FAST) included: the proposals once,
        # the CLIP branch once per MASK_THR, the fusion once per (λ, γ)
        proposals = model.encode_proposals([x], model.default_options)
        use_clip = any(model.uses_clip(o) for o in self.options[0][0])
        for t, per_gamma in enumerate(self.options):
            encoded = proposals
            if use_clip:
                encoded = model.encode_clip_inputs(proposals, per_gamma[0][0])
            for g, per_weight in enumerate(per_gamma):
                for w, options in enumerate(per_weight):
                    if _head_only(options.ensemble_weight, options.seen_ensemble_weight) and t > 0:
                        continue  # λ = 0 does not depend on MASK_THR (see fix_zero_weight)
                    out = model.predict(encoded, options)[0]
                    pred = label_map(out["sem_seg"]).cpu().numpy()
                    self.conf[part, t, g, w] += np.bincount(
                        n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n
                    ).reshape(n, n)

    def fix_zero_weight(self) -> None:
        """λ = 0 cells are only computed at the first threshold: copy them to the others."""
        for w, fusion in enumerate(self.fusions):
            if _head_only(*fusion):
                self.conf[:, 1:, :, w] = self.conf[:, :1, :, w]


def _head_only(weight: float, seen_weight: Optional[float]) -> bool:
    return weight == 0.0 and not seen_weight


def _is_zero(weight: float, seen_weight: Optional[float]) -> bool:
    return weight == 0.0 and seen_weight is None


def _is_one(weight: float, seen_weight: Optional[float]) -> bool:
    return weight == 1.0 and seen_weight is None


def _is_ensemble(weight: float, seen_weight: Optional[float]) -> bool:
    return 0.0 < weight < 1.0


def _is_uniform_ensemble(weight: float, seen_weight: Optional[float]) -> bool:
    return 0.0 < weight < 1.0 and seen_weight is None


def _fusion_label(weight: float, seen_weight: Optional[float]) -> str:
    return f"{weight}" if seen_weight is None else f"{weight} (seen {seen_weight})"


# cross-validated selections: name -> (the (λ, λ_s) pairs it may pick, calibrated?). "searched" is
# the ensemble: λ strictly between 0 and 1 (each branch alone has its own selection), λ_s from the
# grid; "searched_uniform" the ensemble with λ_s = λ (only listed when the grid has other λ_s).
# Uncalibrated selections keep γ = 0; calibrated ones pick γ too (only when the γ grid has values
# > 0).
CV_SELECTIONS = {
    "lambda_0": (_is_zero, False),
    "lambda_1": (_is_one, False),
    "searched": (_is_ensemble, False),
    "searched_uniform": (_is_uniform_ensemble, False),
    "lambda_0_calibrated": (_is_zero, True),
    "lambda_1_calibrated": (_is_one, True),
    "searched_calibrated": (_is_ensemble, True),
    "searched_uniform_calibrated": (_is_uniform_ensemble, True),
}


def cross_validate(conf, fusions, mask_thrs, gammas, metric, class_names, seen, unseen) -> dict:
    """2-fold cross-validation over the two image sets (``cross_validate_cells``) of each
    selection: λ = 0 with its best MASK_THR, λ = 1 with its best MASK_THR, the ensemble (λ, λ_s,
    MASK_THR) with 0 < λ < 1 (and with λ_s = λ when other λ_s were searched); uncalibrated, and
    with γ searched too when the γ grid has values > 0. A selection with no cell in the grid is
    left out.

    Args:
        conf: (2, T, G, F, K+1, K+1) confusion matrices (set, MASK_THR, γ, (λ, λ_s) of
            ``fusions``, prediction, truth).

    Returns:
        {selection: {"picks": [pick on set 0, pick on set 1], metrics of the pooled held-out}}.
    """
    out = {}
    searched_gamma = any(g > 0 for g in gammas)
    searched_seen = any(s is not None for _, s in fusions)
    for name, (allowed, calibrated) in CV_SELECTIONS.items():
        if calibrated and not searched_gamma or "uniform" in name and not searched_seen:
            continue
        cells = [
            (t, g, w)
            for t in range(len(mask_thrs))
            for g, gamma in enumerate(gammas)
            for w, fusion in enumerate(fusions)
            if allowed(*fusion) and (calibrated or gamma == 0.0)
        ]
        if not cells:
            continue
        picks, metrics = cross_validate_cells(
            lambda part, cell: conf[(part, *cell)],
            cells,
            metric,
            class_names,
            seen,
            unseen,
            TABLE_METRICS,
        )
        picks = [
            {
                "ensemble_weight": fusions[w][0],
                "seen_ensemble_weight": fusions[w][1],
                "mask_thr": mask_thrs[t],
                "gamma": gammas[g],
            }
            for t, g, w in picks
        ]
        out[name] = {"picks": picks, **metrics}
    return out


def _cell(row: dict) -> Tuple[float, Optional[float], float, float]:
    """The grid cell of a result row: (λ, λ_s, MASK_THR, γ)."""
    return row["ensemble_weight"], row["seen_ensemble_weight"], row["mask_thr"], row["gamma"]


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="ov_seg")
    setup_logger(name="detectron2")
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    set_num_threads(cfg.RUNTIME.NUM_THREADS)
    if any(not 0.0 <= w <= 1.0 for w in args.weights + args.seen_weights):
        raise SystemExit(
            f"λ and λ_s values must lie in [0, 1]: {args.weights}, {args.seen_weights}"
        )
    fusions = fusion_grid(args.weights, args.seen_weights)
    if 0.0 not in args.gammas or min(args.gammas) < 0:
        raise SystemExit(f"the γ grid must contain 0 and no negative value: {args.gammas}")
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
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    model.semantic_on, model.panoptic_on = True, False
    model.prepare_fast_modes()  # e.g. int8 quantization, after every float weight is loaded
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
    try:
        scorer = GridScorer(
            model, fusions, args.mask_thrs, len(class_names), ignore_label, args.gammas
        )
        for options in scorer.options[0][0]:
            model.check_options(options)
    except ValueError as e:  # γ or λ_s without seen names
        raise SystemExit(str(e))

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "search_state.npz"
    key = search_key(cfg, [fusions, args.mask_thrs, args.gammas], args, dataset, len(dicts))
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
        for g, gamma in enumerate(args.gammas):
            for w, (weight, seen_weight) in enumerate(fusions):
                for part, rows in ((0, results), (1, holdout) if held else (None, None)):
                    if part is None:
                        continue
                    m = sem_seg_metrics(scorer.conf[part, t, g, w], class_names, seen, unseen)
                    rows.append(
                        {
                            "ensemble_weight": weight,
                            "seen_ensemble_weight": seen_weight,
                            "mask_thr": thr,
                            "gamma": gamma,
                            **{k: m[k] for k in TABLE_METRICS if k in m},
                        }
                    )
    if args.metric not in results[0]:
        raise SystemExit(f"metric {args.metric!r} not available; known: {sorted(results[0])}")
    best = max(results, key=lambda r: -np.inf if np.isnan(r[args.metric]) else r[args.metric])
    tables = [(results, args.subset, len(parts) - len(held))]
    if held:
        tables.append((holdout, args.holdout, len(held)))
    columns = [(thr, gamma) for gamma in args.gammas for thr in args.mask_thrs]
    for grid, subset, num in tables:
        at = {_cell(r): r for r in grid}
        for metric in (k for k in TABLE_METRICS if k in grid[0]):
            rows = [
                [_fusion_label(*fusion)]
                + [at[(*fusion, thr, gamma)][metric] for thr, gamma in columns]
                for fusion in fusions
            ]
            print(f"\n{metric} on {dataset} {subset.start}:{subset.stop} ({num} images)")
            headers = [f"{thr}" if len(args.gammas) == 1 else f"{thr} γ{g}" for thr, g in columns]
            print(tabulate(rows, headers=["λ \\ MASK_THR"] + headers, floatfmt=".2f"))
    print(
        f"\nbest by {args.metric}: λ = {best['ensemble_weight']}, "
        f"λ_s = {'λ' if best['seen_ensemble_weight'] is None else best['seen_ensemble_weight']}, "
        f"MASK_THR = {best['mask_thr']}, "
        f"γ = {best['gamma']} "
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
        at = {_cell(r): r for r in holdout}
        summary["holdout"] = {
            "subset": [args.holdout.start, args.holdout.stop],
            "num_images": len(held),
            "best": at[_cell(best)],
            "grid": holdout,
        }
        print(
            "held-out images at the best pair: "
            + ", ".join(
                f"{k} {summary['holdout']['best'][k]:.2f}" for k in TABLE_METRICS if k in best
            )
        )
        summary["cross_validated"] = cross_validate(
            scorer.conf,
            fusions,
            args.mask_thrs,
            args.gammas,
            args.metric,
            class_names,
            seen,
            unseen,
        )
        for name, cv in summary["cross_validated"].items():
            picks = "; ".join(
                f"λ {p['ensemble_weight']}, λ_s {p['seen_ensemble_weight']}, "
                f"MASK_THR {p['mask_thr']}, γ {p['gamma']}"
                for p in cv["picks"]
            )
            print(
                f"2-fold cross-validated {name} (picks {picks}): "
                + ", ".join(f"{k} {cv[k]:.2f}" for k in TABLE_METRICS if k in cv)
            )
    atomic_write_json(out_dir / "search.json", summary)
    return best


if __name__ == "__main__":
    main()
