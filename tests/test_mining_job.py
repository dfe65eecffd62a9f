"""Mining jobs: kill-and-rerun gives byte-identical outputs, shards merge to the unsharded result,
malformed input lines are reported, mined pairs register as a dataset the mask-category mapper
reads."""

import importlib.util
import json

import pytest
import torch
from helpers import REPO

pytest.importorskip("spacy")

from ov_seg.mining.captions import load_captions  # noqa: E402
from ov_seg.mining.job import JobMismatchError, parse_shard  # noqa: E402
from ov_seg.mining.nouns import NounExtractor  # noqa: E402
from ov_seg.mining.nouns_job import finalize_nouns, run_nouns_job  # noqa: E402
from ov_seg.mining.pairs_job import (  # noqa: E402
    GroundTruthProposals,
    finalize_pairs,
    run_pairs_job,
)

NOUN_OUTPUTS = ("nouns.jsonl", "nouns_vocab.json")
PAIR_OUTPUTS = ("pairs.json", "pairs_vocab.json", "crops.tsv")


class Crash(RuntimeError):
    pass


class CrashingExtractor(NounExtractor):
    """Dies in its ``after``-th call, like a killed process (the parts written before stay)."""

    def __init__(self, after: int, **kw):
        super().__init__(**kw)
        self.after, self.calls = after, 0

    def extract(self, texts):
        self.calls += 1
        if self.calls == self.after:
            raise Crash("killed")
        return super().extract(texts)


def _same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def captions(toyworld_root):
    return load_captions("toyworld_captions_train")


@pytest.fixture(scope="module")
def reference_nouns(captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("nouns_ref")
    summary = run_nouns_job(
        captions, NounExtractor(mode="chunk"), out, chunk_size=10, progress=False
    )
    assert summary["complete"] and summary["num_images"] == 48
    return out


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_nouns_kill_and_rerun_is_byte_identical(captions, reference_nouns, tmp_path):
    with pytest.raises(Crash):
        run_nouns_job(
            captions, CrashingExtractor(3, mode="chunk"), tmp_path, chunk_size=10, progress=False
        )
    parts = sorted(p.name for p in (tmp_path / "nouns_parts").iterdir())
    assert (
        parts == ["part-000000.jsonl", "part-000001.jsonl"]
        and not (tmp_path / "nouns.jsonl").exists()
    )
    (tmp_path / "nouns_parts" / "part-000002.jsonl.tmp999").write_text(
        '{"half a li'
    )  # a write cut short
    resumed = CrashingExtractor(0, mode="chunk")
    summary = run_nouns_job(captions, resumed, tmp_path, chunk_size=10, progress=False)
    assert summary["complete"] and summary["chunks_run"] == 3 and resumed.calls == 3
    assert not list((tmp_path / "nouns_parts").glob("*.tmp*"))
    _same_files(tmp_path, reference_nouns, NOUN_OUTPUTS)
    again = run_nouns_job(captions, resumed, tmp_path, chunk_size=10, progress=False)
    assert again["chunks_run"] == 0 and resumed.calls == 3  # a finished job is a no-op
    _same_files(tmp_path, reference_nouns, NOUN_OUTPUTS)


def test_nouns_shards_merge_to_the_unsharded_result(captions, reference_nouns, tmp_path):
    ex = NounExtractor(mode="chunk")
    dirs = [tmp_path / f"shard{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        s = run_nouns_job(captions, ex, d, chunk_size=10, shard=(i, 3), progress=False)
        assert not s["complete"]
    with pytest.raises(FileNotFoundError, match="chunks have no part"):
        finalize_nouns(dirs[:2], tmp_path / "merged")
    finalize_nouns(dirs, tmp_path / "merged")
    _same_files(tmp_path / "merged", reference_nouns, NOUN_OUTPUTS)
    shared = tmp_path / "shared"  # shards writing into one folder: the last one finalizes
    summaries = [
        run_nouns_job(captions, ex, shared, chunk_size=10, shard=(i, 2), progress=False)
        for i in (0, 1)
    ]
    assert [s["complete"] for s in summaries] == [False, True]
    _same_files(shared, reference_nouns, NOUN_OUTPUTS)


def test_job_folder_holding_another_job_is_refused(captions, reference_nouns):
    with pytest.raises(JobMismatchError, match="mode"):
        run_nouns_job(
            captions, NounExtractor(mode="noun"), reference_nouns, chunk_size=10, progress=False
        )


def test_cli_reports_malformed_lines(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "mine_captions", REPO / "tools" / "mine_captions.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tmp_path / "caps.csv"
    table.write_text(
        "image,caption\n1.jpg,A dog on a red sofa .\n2.jpg\n3.jpg,Two cats and a fire truck .\n"
    )
    out = tmp_path / "job"
    summary = tool.main(
        ["nouns", "--captions", str(table), "--output-dir", str(out), "--no-progress"]
    )
    assert summary["num_images"] == 2 and summary["skipped_lines"] == 1
    assert (out / "nouns_problems.txt").read_text() == f"{table}:3: expected 2 fields, got 1\n"
    lines = [json.loads(x) for x in (out / "nouns.jsonl").read_text().splitlines()]
    assert [x["nouns"] for x in lines] == [[["dog", "sofa"]], [["cat", "fire truck"]]]
    with pytest.raises(Exception, match=f"{table}:3"):
        tool.main(
            ["nouns", "--captions", str(table), "--output-dir", str(tmp_path / "s"), "--strict"]
        )


# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crop_classifier():
    from ov_seg.modeling.clip import MaskedCropClassifier, build_clip

    torch.manual_seed(0)
    clip = build_clip("ovseg-tiny-vit8-64", None)
    return MaskedCropClassifier(clip_model=clip, templates="toyworld").eval()


def _pairs(reference_nouns, proposals, clf, out, **kw):
    kw = {"crops": True, "batch_size": 4, "chunk_size": 12, "progress": False, **kw}
    return run_pairs_job(
        reference_nouns / "nouns.jsonl", proposals, clf, out, {"proposals": "gt"}, **kw
    )


@pytest.fixture(scope="module")
def mined_gt(reference_nouns, crop_classifier, tmp_path_factory):
    """Pairs mined with ground-truth segments as proposals and a random tiny CLIP (48 images)."""
    out = tmp_path_factory.mktemp("mined") / "ref"
    s = _pairs(
        reference_nouns, GroundTruthProposals("toyworld_panoptic_train"), crop_classifier, out
    )
    assert s["complete"] and s["num_images"] == 48 and s["num_pairs"] > 48
    return out


def test_pairs_output_and_precision(mined_gt):
    from ov_seg.mining.evaluate import mining_precision

    coco = json.loads((mined_gt / "pairs.json").read_text())
    keys = {"segmentation", "category", "category_id", "score", "image_id", "proposal_category"}
    assert all(keys <= set(a) for a in coco["annotations"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert all(names[a["category_id"]] == a["category"] for a in coco["annotations"])
    tsv = (mined_gt / "crops.tsv").read_text().splitlines()
    assert tsv[0] == "filepath\ttitle" and len(tsv) == len(coco["annotations"]) + 1
    assert all((mined_gt / row.split("\t")[0]).is_file() for row in tsv[1:])
    # ground-truth proposals: a pair is correct (IoU 1) exactly when the chosen segment has its
    # class
    p = mining_precision(coco, "toyworld_panoptic_train")
    same = [a["proposal_category"] == a["category"] for a in coco["annotations"]]
    assert p["num_pairs"] == len(same) and p["precision"] == pytest.approx(sum(same) / len(same))


def test_pairs_resume_and_shards_are_byte_identical(
    mined_gt, reference_nouns, crop_classifier, tmp_path
):
    gt = GroundTruthProposals("toyworld_panoptic_train")
    killed = tmp_path / "killed"  # a run stopped after 2 of 4 chunks, then resumed
    assert not _pairs(reference_nouns, gt, crop_classifier, killed, max_chunks=2)["complete"]
    assert _pairs(reference_nouns, gt, crop_classifier, killed)["chunks_run"] == 2
    _same_files(killed, mined_gt, PAIR_OUTPUTS)
    dirs = [tmp_path / f"s{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        _pairs(reference_nouns, gt, crop_classifier, d, shard=(i, 2))
    finalize_pairs(dirs, tmp_path / "merged")
    _same_files(tmp_path / "merged", mined_gt, ("pairs.json", "pairs_vocab.json"))
    tsv = (tmp_path / "merged" / "crops.tsv").read_text().splitlines()[1:]
    assert all((tmp_path / "merged" / row.split("\t")[0]).is_file() for row in tsv)


def test_mined_pairs_register_for_the_mask_category_mapper(mined_gt):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ov_seg.data.dataset_mappers.mask_category import MaskCategoryDatasetMapper
    from ov_seg.data.datasets.register_mined import register_mined_pairs

    register_mined_pairs("test_mined_pairs", mined_gt / "pairs.json")
    dicts = DatasetCatalog.get("test_mined_pairs")
    coco = json.loads((mined_gt / "pairs.json").read_text())
    assert len(dicts) == len({a["image_id"] for a in coco["annotations"]})
    vocab = MetadataCatalog.get("test_mined_pairs").stuff_classes
    assert vocab == sorted({a["category"] for a in coco["annotations"]})
    mapper = MaskCategoryDatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="RGB",
        ignore_label=255,
        min_area=1,
        dataset_name="test_mined_pairs",
    )
    x = mapper(dicts[0])
    assert x["masks"].shape[0] == len(x["categories"]) == len(dicts[0]["pairs"])
    assert [vocab[i] for i in x["category_ids"].tolist()] == x["categories"]


def test_mask_adapted_clip_trains_on_mined_pairs_with_one_config_line(
    mined_gt, toyworld_root, tmp_path
):
    import shutil

    from helpers import run_train_net

    from ov_seg.data.datasets.register_mined import register_all_mined

    shutil.copytree(mined_gt, toyworld_root / "mined_gt_train", dirs_exist_ok=True)
    register_all_mined(toyworld_root.parent)
    run_train_net(
        [
            "--config-file",
            str(REPO / "configs/toyworld/clip_mpt.yaml"),
            "DATASETS.TRAIN",
            '("toyworld_mined_gt_train",)',  # the one line
            "DATASETS.TEST",
            "()",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert metrics and all(
        torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m
    )


# ---- bad input and reruns (issue 23) -------------------------------------------------------------
def _tool():
    spec = importlib.util.spec_from_file_location(
        "mine_captions", REPO / "tools" / "mine_captions.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_pairs_do_not_depend_on_the_chunk_size_or_the_shards(
    mined_gt, reference_nouns, crop_classifier, tmp_path
):
    """Case 16: pairs differed between chunk sizes (a chunk boundary cut a CLIP batch; nouns new in
    a call were encoded together)."""
    gt = GroundTruthProposals("toyworld_panoptic_train")
    _pairs(reference_nouns, gt, crop_classifier, tmp_path / "c5", chunk_size=5)  # batch 4
    _same_files(tmp_path / "c5", mined_gt, ("pairs.json", "pairs_vocab.json"))
    dirs = [tmp_path / f"s{i}" for i in range(3)]  # three processes, chunks of 3 images
    for i, d in enumerate(dirs):
        _pairs(reference_nouns, gt, crop_classifier, d, chunk_size=3, shard=(i, 3))
    finalize_pairs(dirs, tmp_path / "merged")
    _same_files(tmp_path / "merged", mined_gt, ("pairs.json", "pairs_vocab.json"))


def test_nouns_do_not_depend_on_the_chunk_size_or_the_process_count(
    captions, reference_nouns, tmp_path
):
    ex = NounExtractor(mode="chunk", n_process=2)
    run_nouns_job(captions, ex, tmp_path, chunk_size=7, progress=False)
    _same_files(tmp_path, reference_nouns, NOUN_OUTPUTS)


def test_a_replaced_job_leaves_no_output_of_the_old_one(tmp_path):
    """Rerun with other inputs (--overwrite): the old job's final outputs went only when the new
    one finished, and nouns_problems.txt / crops stayed for good."""
    table = tmp_path / "caps.csv"
    table.write_text("image,caption\n1.jpg,A dog on a red sofa .\n2.jpg\n3.jpg,Two cats .\n")
    out = tmp_path / "job"
    args = ["nouns", "--captions", str(table), "--output-dir", str(out), "--no-progress"]
    tool = _tool()
    tool.main([*args, "--chunk-size", "1"])
    assert (out / "nouns_problems.txt").is_file() and (out / "nouns.jsonl").is_file()
    table.write_text("image,caption\n4.jpg,A horse in a field .\n5.jpg,A boat .\n")
    with pytest.raises(JobMismatchError):
        tool.main([*args, "--chunk-size", "1"])
    partial = tool.main([*args, "--chunk-size", "1", "--overwrite", "--max-chunks", "1"])
    assert not partial["complete"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["nouns_job.json"]
    tool.main([*args, "--chunk-size", "1"])
    lines = [json.loads(x) for x in (out / "nouns.jsonl").read_text().splitlines()]
    assert [x["image_id"] for x in lines] == ["4.jpg", "5.jpg"]
    assert not (out / "nouns_problems.txt").exists()


def test_cli_summarises_skipped_captions_by_reason(tmp_path):
    table = tmp_path / "caps.csv"
    table.write_bytes(
        "\ufeffimage,caption\n1.jpg,A dog on a red sofa .\n2.jpg\n"
        "3.jpg,Un perro corre en la playa .\n4.jpg,Hello .\n".encode("utf-8")
    )
    out = tmp_path / "job"
    summary = _tool().main(
        ["nouns", "--captions", str(table), "--output-dir", str(out), "--no-progress"]
    )
    assert summary["num_images"] == 2
    assert summary["skipped_captions"] == {"malformed": 1, "language": 1, "no_noun": 1}
    saved = json.loads((out / "nouns_summary.json").read_text())
    assert saved["skipped_captions"] == summary["skipped_captions"]
    problems = (out / "nouns_problems.txt").read_text().splitlines()
    assert [p.split(": ")[0] for p in problems] == [f"{table}:3", f"{table}:4"]
