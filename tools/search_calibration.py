#!/usr/bin/env python
"""Choose the seen-class calibration γ (``MODEL.SEEN_CALIBRATION.GAMMA``, calibrated stacking:
ov_seg.modeling.calibration) of single-stage models (PACL, MGCA, MixReorg) on held-out images.

For every ``--method NAME=CONFIG:WEIGHTS:OPTS`` (WEIGHTS may be empty; OPTS are config overrides,
split like a shell command line), each image is encoded once (``model.encode_inputs``) and scored
once per γ of the grid (``model.predict`` with ``InferenceOptions(seen_gamma=γ)``) into one
confusion matrix per (image set, γ). With ``--holdout``, a 2-fold
cross-validation picks γ on one image set and scores it on the other, both ways, pooled: every image
is scored by a γ that was not chosen on it ('calibrated'); 'uncalibrated' is γ = 0 on the same
images (the plain model). Where the dataset describes names by attributes (the toy world), the
plain model's dense probe (``ov_seg.evaluation.open_vocab_sem_seg``: the mean scores over each
ground-truth region, classified) is in ``dense_probe``. Writes ``OUTPUT/NAME/search.json``;
progress is saved every ``--save-every`` images and resumed with ``--resume``.

    python tools/search_calibration.py --output /tmp/calib --gammas 0,0.25,0.5,1,2 \\
        --subset 0:150 --holdout 150:300 --metric hIoU \\
        --method "pacl=configs/toyworld/pacl.yaml:out/pacl/model_final.pth:MODEL.CLIP.PRETRAINED c"
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate
from tqdm import tqdm

import ov_seg  # noqa: F401 (registration)
from ov_seg.data import build_dataset_mapper
from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.engine.methods import build_method, parse_method_spec
from ov_seg.engine.pipeline import atomic_write_json
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.evaluation.grid_search import (
    TABLE_METRICS,
    add_image_set_arguments,
    cross_validate_cells,
    load_extra_state,
    load_state,
    parse_grid,
    save_state,
    search_key,
)
from ov_seg.evaluation.mask_classification import attribute_probe_metrics
from ov_seg.evaluation.open_vocab_sem_seg import region_votes, sem_seg_metrics, vote_logits
from ov_seg.modeling.meta_arch.base import OpenVocabSegmentor
from ov_seg.utils.semseg import label_map
from ov_seg.utils.threads import set_num_threads

logger = logging.getLogger("ov_seg.search_calibration")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--method",
        type=parse_method_spec,
        action="append",
        required=True,
        help="NAME=CONFIG:WEIGHTS:OPTS (repeatable; searched one after the other)",
    )
    p.add_argument("--output", required=True, help="output folder (NAME/search.json)")
    p.add_argument(
        "--gammas",
        type=parse_grid,
        default=parse_grid("0,0.25,0.5,1,2"),
        help="γ grid (a,b,... or a:b:step); must contain 0",
    )
    add_image_set_arguments(
        p,
        metric="hIoU",
        holdout_help="START:END of held-out images (2-fold cross-validation with --subset)",
    )
    return p


def search_method(name: str, config: str, weights: str, opts: List[str], args) -> Dict:
    """Run the γ search of one method; write and return its summary."""
    cfg, model = build_method(get_ov_seg_cfg(), config, weights, opts)
    if not isinstance(model, OpenVocabSegmentor) or not hasattr(model, "encode_inputs"):
        raise SystemExit(f"{cfg.MODEL.META_ARCHITECTURE} has no seen-class calibration")
    set_num_threads(cfg.RUNTIME.NUM_THREADS)
    calibration = model.seen_calibration
    if max(args.gammas) > 0 and not calibration.seen_names:
        raise SystemExit(
            f"{name}: no seen names (MODEL.SEEN_CALIBRATION.SEEN_NAMES, or seen_classes metadata "
            "of DATASETS.TEST / TRAIN): nothing to calibrate"
        )
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    if dataset not in DatasetCatalog.list():
        raise SystemExit(f"{name}: unknown or no dataset {dataset!r} (pass --dataset)")
    meta = MetadataCatalog.get(dataset)
    class_names = list(meta.get("stuff_classes", None) or [])
    seen, unseen = meta.get("seen_class_ids", None), meta.get("unseen_class_ids", None)
    all_dicts = DatasetCatalog.get(dataset)
    dicts = all_dicts[args.subset]
    held = all_dicts[args.holdout] if args.holdout is not None else []
    if not dicts or (args.holdout is not None and not held):
        raise SystemExit(f"{name}: an empty image set ({args.subset} / {args.holdout})")
    names = [d["file_name"] for d in dicts]
    if set(names) & {d["file_name"] for d in held}:
        raise SystemExit(f"--subset {args.subset} and --holdout {args.holdout} overlap")
    parts = [0] * len(dicts) + [1] * len(held)
    dicts = dicts + held
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name=dataset)
    n = len(class_names) + 1
    ignore = int(meta.get("ignore_label", 255))
    conf = np.zeros((2, len(args.gammas), n, n), dtype=np.int64)

    out_dir = Path(args.output) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "search_state.npz"
    key = search_key(cfg, [args.gammas], args, dataset, len(dicts))
    start, conf = load_state(state_path, key, conf, args.resume)
    # dense probe of the plain model (γ = 0): what its scores say about each ground-truth region
    attributes = dict(meta.get("class_attributes", {}) or {})
    probe = bool(attributes) and bool(unseen) and 0.0 in args.gammas
    plain = args.gammas.index(0.0) if probe else -1  # the first γ = 0 cell only
    rows: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    if probe and start:
        saved = load_extra_state(state_path, key, ("probe_rows", "probe_labels"))
        if not saved:  # progress without the probe's votes: recount everything
            start, conf = 0, np.zeros_like(conf)
        else:
            rows, labels = [saved["probe_rows"]], [saved["probe_labels"]]

    def extra():
        if not probe or not rows:
            return None
        return {"probe_rows": np.concatenate(rows), "probe_labels": np.concatenate(labels)}

    options = [model.default_options.replace(seen_gamma=float(g)) for g in args.gammas]
    with torch.inference_mode():
        for i in tqdm(range(start, len(dicts)), initial=start, total=len(dicts), desc=name):
            d = dicts[i]
            x = mapper(d)
            gt = read_label_image(d["sem_seg_file_name"]).astype(np.int64)
            gt[gt == ignore] = n - 1
            encoded = model.encode_inputs([x])  # γ changes only the scoring
            for g, opts in enumerate(options):
                sem_seg = model.predict(encoded, opts)[0]["sem_seg"]
                if tuple(sem_seg.shape[-2:]) != gt.shape:
                    raise SystemExit(f"{d['file_name']}: output {sem_seg.shape}, truth {gt.shape}")
                pred = label_map(sem_seg).cpu().numpy()
                conf[parts[i], g] += np.bincount(
                    n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n
                ).reshape(n, n)
                if probe and g == plain:
                    votes, present = region_votes(sem_seg, gt, n - 1, n - 1)
                    rows.append(votes.numpy())
                    labels.append(present.numpy())
            if (i + 1) % args.save_every == 0 and i + 1 < len(dicts):
                save_state(state_path, key, i + 1, conf, extra())
    save_state(state_path, key, len(dicts), conf, extra())

    def metrics(part, g):
        m = sem_seg_metrics(conf[part, g], class_names, seen, unseen)
        return {"gamma": args.gammas[g], **{k: m[k] for k in TABLE_METRICS if k in m}}

    if args.metric not in metrics(0, 0):
        raise SystemExit(f"metric {args.metric!r} not available for {dataset!r}")
    grid = [metrics(0, g) for g in range(len(args.gammas))]
    best = max(grid, key=lambda r: -np.inf if np.isnan(r[args.metric]) else r[args.metric])
    summary = {
        "method": name,
        "config": config,
        "weights": weights,
        "dataset": dataset,
        "metric": args.metric,
        "subset": [args.subset.start, args.subset.stop],
        "num_images": len(parts) - len(held),
        "grid": grid,
        "best": best,
    }
    if probe and rows:
        # every image of both sets, plain model (the rows are mean class scores per region)
        logits = vote_logits(torch.from_numpy(np.concatenate(rows)))
        truth = torch.from_numpy(np.concatenate(labels)).long()
        summary["dense_probe"] = dict(
            attribute_probe_metrics(logits, truth, attributes, seen or (), unseen)
        )
        p = summary["dense_probe"]
        print(
            f"{name}: dense probe (γ 0, {len(truth)} regions): colour seen / unseen "
            f"{p['colour_seen']:.1f} / {p['colour_unseen']:.1f}, shape within colour "
            f"{p['shape_within_colour_seen']:.1f} / {p['shape_within_colour_unseen']:.1f} "
            f"(chance {p['chance_shape_within_colour']:.1f})"
        )
    tables = [("images " + f"{args.subset.start}:{args.subset.stop}", grid)]
    if held:
        holdout = [metrics(1, g) for g in range(len(args.gammas))]
        summary["holdout"] = {
            "subset": [args.holdout.start, args.holdout.stop],
            "num_images": len(held),
            "grid": holdout,
            "best": holdout[args.gammas.index(best["gamma"])],
        }
        tables.append((f"held-out images {args.holdout.start}:{args.holdout.stop}", holdout))
        selections = {"uncalibrated": [0.0], "calibrated": list(args.gammas)}
        summary["cross_validated"] = {}
        for sel, allowed in selections.items():
            if not any(g in args.gammas for g in allowed):
                continue
            cells = [args.gammas.index(g) for g in allowed if g in args.gammas]
            picks, cv = cross_validate_cells(
                lambda part, g: conf[part, g],
                cells,
                args.metric,
                class_names,
                seen,
                unseen,
                TABLE_METRICS,
            )
            summary["cross_validated"][sel] = {
                "picks": [{"gamma": args.gammas[g]} for g in picks],
                **cv,
            }
    for title, rows in tables:
        print(f"\n{name} on {dataset}, {title}")
        print(
            tabulate(
                [[r["gamma"], *(r.get(k, float("nan")) for k in TABLE_METRICS)] for r in rows],
                headers=["γ", *TABLE_METRICS],
                floatfmt=".2f",
            )
        )
    for sel, cv in summary.get("cross_validated", {}).items():
        picks = "/".join(str(p["gamma"]) for p in cv["picks"])
        print(
            f"{name}: 2-fold cross-validated {sel} (γ picks {picks}): "
            + ", ".join(f"{k} {cv[k]:.2f}" for k in TABLE_METRICS if k in cv)
        )
    atomic_write_json(out_dir / "search.json", summary)
    return summary


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="ov_seg")
    setup_logger(name="detectron2")
    if 0.0 not in args.gammas:
        raise SystemExit(f"the γ grid must contain 0 (the plain model): {args.gammas}")
    if min(args.gammas) < 0:
        raise SystemExit(f"γ must be >= 0: {args.gammas}")
    return {name: search_method(name, c, w, o, args) for name, c, w, o in args.method}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
