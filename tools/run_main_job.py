#!/usr/bin/env python
"""The main job: the whole pipeline on the embedded toy world, as a chain of normal launches.

    python tools/run_main_job.py --output output/main_job          # run (finished stages are skipped)
    python tools/run_main_job.py --output output/main_job --force train_semseg

Every stage is an ordinary command (printed as it starts) that can be re-run on its own; logs go to
``<output>/logs/``; the report to ``<output>/report.md`` and ``report.json``.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ov_seg.engine.pipeline import Stage, atomic_write_json, run_stages  # noqa: E402


def build_stages(out: Path, data_root: Path):
    """The stages of the main job, in order."""
    tw = data_root / "toyworld"
    train_net = str(REPO / "tools" / "train_net.py")
    semseg = out / "semseg_R18"
    return [
        Stage(
            "generate_toyworld",
            [str(REPO / "datasets" / "prepare_toyworld.py"), "--root", str(tw)],
            outputs=[str(tw / s / "DONE.json") for s in ("train", "val", "web")],
            estimate_s=60,
        ),
        Stage(
            "train_semseg_baseline",
            [train_net, "--config-file", str(REPO / "configs/toyworld/semseg_R18.yaml"),
             "OUTPUT_DIR", str(semseg)],
            outputs=[str(semseg / "model_final.pth")],
            estimate_s=120,
        ),
        Stage(
            "eval_semseg_baseline",
            [train_net, "--config-file", str(REPO / "configs/toyworld/semseg_R18.yaml"), "--eval-only",
             "MODEL.WEIGHTS", str(semseg / "model_final.pth"), "OUTPUT_DIR", str(semseg / "eval")],
            outputs=[str(semseg / "eval" / "eval_results.json")],
            estimate_s=20,
        ),
    ]


def _metrics(path: Path) -> dict:
    res = json.loads(path.read_text())["sem_seg"]
    return {k: res[k] for k in ("mIoU", "fwIoU", "pACC") if k in res}


def write_report(out: Path, records: dict, elapsed: float) -> str:
    """Write report.md / report.json; return the table printed on the console."""
    rows = [("closed-vocabulary baseline (SemanticSegmentor R18, all 69 classes supervised)",
             _metrics(out / "semseg_R18" / "eval" / "eval_results.json"))]
    table = ["| method | mIoU | fwIoU | pixel acc |", "|---|---|---|---|"]
    for name, m in rows:
        table.append(f"| {name} | {m.get('mIoU', float('nan')):.1f} | {m.get('fwIoU', float('nan')):.1f}"
                     f" | {m.get('pACC', float('nan')):.1f} |")
    timing = ["| stage | seconds | peak RSS (MiB) | skipped |", "|---|---|---|---|"]
    for name, r in records.items():
        timing.append(f"| {name} | {r['seconds']} | {r.get('peak_rss_mib')} | {r['skipped']} |")
    md = "\n".join(["# ov_seg main job on the toy world", "", "## Results (toyworld_sem_seg_val)", "",
                    *table, "", "## Stages", "", *timing, "",
                    f"Total wall time of this run: {elapsed:.0f} s", ""])
    (out / "report.md").write_text(md)
    atomic_write_json(out / "report.json", {"results": dict(rows), "stages": records,
                                            "elapsed_s": round(elapsed, 1)})
    return "\n".join(table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", default="output/main_job")
    p.add_argument("--force", nargs="*", default=[], help="stage names to re-run")
    args = p.parse_args(argv)
    out = Path(args.output).resolve()
    data_root = Path(os.environ.get("DETECTRON2_DATASETS", REPO / "datasets")).resolve()
    os.environ["DETECTRON2_DATASETS"] = str(data_root)
    start = time.perf_counter()
    try:
        records = run_stages(build_stages(out, data_root), out, force=args.force)
    except RuntimeError as e:
        print(f"main job stopped: {e}", file=sys.stderr)
        return 1
    print(write_report(out, records, time.perf_counter() - start))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
