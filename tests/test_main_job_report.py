"""tools/run_main_job.py: the stage list and the report built from the searches' outputs."""

import json

import pytest
from helpers import load_tool


def _cv(seen, unseen, picks, key):
    h = 2 * seen * unseen / (seen + unseen)
    return {
        "picks": [{key: p} for p in picks],
        "mIoU-seen": seen,
        "mIoU-unseen": unseen,
        "hIoU": h,
        "mIoU": (seen + unseen) / 2,
    }


def test_stages_and_report(toyworld_root, tmp_path):
    job = load_tool("run_main_job")
    out = tmp_path / "out"
    stages = job.build_stages(out, toyworld_root.parent)
    names = [s.name for s in stages]
    assert names[-2:] == ["calibration_search", "prediction_grid"]
    search = next(s for s in stages if s.name == "calibration_search")
    searched = ("pacl", "mgca", "mixreorg", "pacl_vanilla", "mgca_pixel", "mixreorg_nomix")
    assert set(search.outputs) == {str(out / "calibration" / m / "search.json") for m in searched}
    assert search.command.count("--method") == 6
    specs = dict(a.split("=", 1) for a in search.command if a.startswith(searched))
    assert "UNIT_MODE pixel" in specs["mgca_pixel"]
    assert str(out / "mgca" / "model_final.pth") in specs["mgca_pixel"]
    assert "mixreorg_nomix.yaml" in specs["mixreorg_nomix"]
    assert specs["pacl_vanilla"].split(":")[1] == ""  # nothing trained
    # trained without a final evaluation: the search scores them; the no-mixing baseline trains
    # with MixReorg's budget
    for method in (*job.SINGLE_STAGE, "mixreorg_nomix"):
        train = next(s for s in stages if s.name == method)
        assert "DATASETS.TEST" in train.command and train.outputs[0].endswith("model_final.pth")
    budget = job.BUDGET["mixreorg"]
    nomix = next(s for s in stages if s.name == "mixreorg_nomix").command
    assert nomix[nomix.index(budget[0]) + 1] == budget[1]

    for method, (plain, cal) in {
        "pacl": ((5.0, 0.4), (4.0, 3.0)),
        "pacl_vanilla": ((3.0, 0.1), (2.0, 1.5)),
        "mgca": ((9.0, 3.0), (8.0, 8.0)),
        "mixreorg": ((4.0, 0.5), (3.0, 1.5)),
        "mixreorg_nomix": ((3.5, 0.25), (3.0, 1.0)),
    }.items():
        folder = out / "calibration" / method
        folder.mkdir(parents=True)
        summary = {
            "best": {"gamma": 0.5},
            "cross_validated": {
                "uncalibrated": _cv(*plain, [0.0, 0.0], "gamma"),
                "calibrated": _cv(*cal, [0.5, 1.0], "gamma"),
            },
        }
        if method == "mgca":
            summary["dense_probe"] = {
                "chance_top1": 1.45,
                "chance_colour": 12.5,
                "chance_shape_within_colour": 12.5,
                **{f"{k}_{s}": 10.0 for k in ("top1", "colour") for s in ("seen", "unseen")},
                "shape_within_colour_seen": 14.0,
                "shape_within_colour_unseen": 12.0,
            }
        (folder / "search.json").write_text(json.dumps(summary))
    selections = [("lambda_0", 0.0), ("lambda_1", 1.0), ("searched", 0.8)]
    selections += [(name + "_calibrated", w) for name, w in selections]
    two_stage = {
        "best": {"ensemble_weight": 0.8, "mask_thr": 0.4, "gamma": 2.0},
        "cross_validated": {
            name: {
                **_cv(8.0, 3.0 + i, [w, w], "ensemble_weight"),
                "picks": [{"ensemble_weight": w, "mask_thr": 0.4, "gamma": 2.0 * (i >= 3)}] * 2,
            }
            for i, (name, w) in enumerate(selections)
        },
    }
    (out / "two_stage_search").mkdir(parents=True)
    (out / "two_stage_search" / "search.json").write_text(json.dumps(two_stage))
    records = {"generate_toyworld": {"seconds": 1.0, "peak_rss_mib": 10.0, "skipped": False}}
    table = job.write_report(out, records, elapsed=2.0)

    report = json.loads((out / "report.json").read_text())["results"]
    assert report["PACL"]["mIoU-unseen"] == 0.4 and report["PACL"]["gamma"] == "0.0/0.0"
    assert report["PACL, seen-calibrated †"]["mIoU-unseen"] == 3.0
    assert report["PACL, seen-calibrated †"]["gamma"] == "0.5/1.0"
    assert report["MGCA, seen-calibrated †"]["hIoU"] == 8.0
    searched = report["two-stage OVSeg, searched λ / λ_s / MASK_THR (ensemble) *"]
    assert searched["mIoU-unseen"] == 5.0 and searched["ensemble_weight"] == "0.8/0.8"
    assert searched["gamma"] == "0.0/0.0"
    calibrated = report["two-stage OVSeg, ensemble, seen-calibrated *†"]
    assert calibrated["mIoU-unseen"] == 8.0 and calibrated["gamma"] == "2.0/2.0"
    assert report["two-stage OVSeg, λ = 1, seen-calibrated *†"]["mIoU-unseen"] == 7.0
    ts = next(s for s in stages if s.name == "two_stage_search")
    assert ts.command[ts.command.index("--gammas") + 1] == "0.0,1.0,2.0,4.0"
    assert "| MixReorg, seen-calibrated † | 3.0 | 1.5 |" in table
    assert "| MixReorg baseline: no mixing (GroupViT-style) | 3.5 | 0.2 |" in table
    assert "| MGCA baseline: pixel unit | n/a |" in table  # no search written for it
    md = (out / "report.md").read_text()
    assert "seen-calibrated" in md
    assert "| MGCA (adaptive semantic unit) | 10.0 / 10.0 | 10.0 / 10.0 | 14.0 / 12.0 |" in md
    assert "| chance | 1.4 | 12.5 | 12.5 |" in md.split("## Dense probe")[1]
    assert json.loads((out / "report.json").read_text())["dense_probe"].keys() == {"mgca"}


def test_probe_table_oracle_row_and_seeded_stages(toyworld_root, tmp_path):
    job = load_tool("run_main_job")
    out = tmp_path / "out"
    probe = {
        "chance_top1": 1.45,
        "chance_colour": 12.5,
        "chance_shape_within_colour": 12.5,
        **{
            f"{k}_{s}": v for k, v in (("top1", 40.0), ("colour", 99.0)) for s in ("seen", "unseen")
        },
        "shape_within_colour_seen": 81.0,
        "shape_within_colour_unseen": 55.5,
    }
    cal = {**probe, "top1_unseen": 70.0, "shape_within_colour_unseen": 71.0}
    cal.update(gamma_fold0=2.0, gamma_fold1=3.0)
    (out / "clip_mpt").mkdir(parents=True)
    (out / "clip_mpt" / "eval_results.json").write_text(
        json.dumps({"mask_cls": {}, "probe": probe, "probe_calibrated": cal})
    )
    lines = job.probe_report(out)
    mpt = next(line for line in lines if line.startswith("| + FT + MPT"))
    assert "81.0 / 55.5" in mpt and "70.0 / 71.0 (2/3)" in mpt
    assert next(line for line in lines if line.startswith("| pre-trained")).count("n/a") == 4
    assert lines[-1].startswith("| chance | 1.4 | 12.5 | 12.5")

    (out / "oracle_masks").mkdir()
    oracle = {"mIoU-seen": 60.0, "mIoU-unseen": 45.0, "hIoU": 51.4, "mIoU": 57.0}
    (out / "oracle_masks" / "eval_results.json").write_text(json.dumps({"sem_seg": oracle}))
    job.write_report(out, {"x": {"seconds": 1.0, "peak_rss_mib": 1.0, "skipped": False}}, 1.0)
    report = json.loads((out / "report.json").read_text())
    assert report["results"][job.ORACLE_ROW]["mIoU-unseen"] == 45.0
    colour = report["colour_only"]["mIoU-unseen"]
    assert report["chance"]["mIoU-unseen"] < colour < 50.0

    stages = job.build_stages(out, toyworld_root.parent)
    seeded = [job.with_seed(s, 3) for s in stages]
    pre = next(s for s in seeded if s.name == "clip_pretrain")
    assert pre.command[-2:] == ["SEED", "3"]
    assert (
        next(s for s in seeded if s.name == "generate_toyworld").command
        == next(s for s in stages if s.name == "generate_toyworld").command
    )
    names = [s.name for s in stages]
    assert names.index("oracle_masks") > names.index("two_stage_search")
    claims = [s.name for s in job.claim_stages(out)]
    assert claims == [
        "two_stage_search_ft_only",
        "clip_ft_gt_pairs",
        "clip_mpt_gt_pairs",
        "two_stage_search_gt_pairs",
    ]


def test_seed_summary_mean_and_std(tmp_path):
    job = load_tool("run_main_job")
    dirs = []
    for seed, unseen in enumerate((20.0, 24.0, 28.0)):
        d = tmp_path / f"s{seed}"
        (d / "two_stage_search").mkdir(parents=True)
        cv = {"searched": {"mIoU-seen": 30.0, "mIoU-unseen": unseen, "hIoU": 25.0}}
        (d / "two_stage_search" / "search.json").write_text(json.dumps({"cross_validated": cv}))
        dirs.append(d)
    table = job.seed_summary(dirs)
    line = next(x for x in table.splitlines() if "FT + MPT), searched, mIoU-unseen" in x)
    assert "| 24.0 ± 4.0 | 20.0, 24.0, 28.0 |" in line
    assert "(3 seeds)" in table.splitlines()[0]


def test_budget_overrides_replace_one_stage(tmp_path):
    job = load_tool("run_main_job")
    budget = job.parse_budget(["clip_pretrain=SOLVER.MAX_ITER 800"])
    assert budget["clip_pretrain"] == ["SOLVER.MAX_ITER", "800"]
    assert budget["proposals"] == job.BUDGET["proposals"]  # the others untouched
    assert job.BUDGET["clip_pretrain"] != budget["clip_pretrain"]  # BUDGET itself unchanged
    stage = {st.name: st for st in job.build_stages(tmp_path, tmp_path, budget)}["clip_pretrain"]
    i = stage.command.index("SOLVER.MAX_ITER")
    assert stage.command[i + 1] == "800" and stage.command.count("SOLVER.MAX_ITER") == 1
    for bad in ("nosuchstage=SOLVER.MAX_ITER 1", "clip_pretrain", "clip_ft=SOLVER.MAX_ITER"):
        with pytest.raises(ValueError):
            job.parse_budget([bad])


def test_pick_options_carry_the_seen_weight_only_when_searched():
    job = load_tool("run_main_job")
    pick = {"ensemble_weight": 0.7, "seen_ensemble_weight": 0.2, "mask_thr": 0.45, "gamma": 0.0}
    assert job.pick_options(pick) == [
        "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
        "0.7",
        "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT",
        "0.2",
        "MODEL.CLIP.MASK_THR",
        "0.45",
        "MODEL.SEEN_CALIBRATION.GAMMA",
        "0.0",
    ]
    uniform = {"ensemble_weight": 0.6, "seen_ensemble_weight": None, "mask_thr": 0.35}
    assert job.pick_options(uniform) == [
        "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
        "0.6",
        "MODEL.CLIP.MASK_THR",
        "0.35",
    ]
