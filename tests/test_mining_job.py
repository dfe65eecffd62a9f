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

NOUN_OUTPUTS = ("nouns.jsonl", "vocab.json")
PAIR_OUTPUTS = ("pairs.json", "vocab.json", "crops.tsv")


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
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert (
        parts == ["part-000000.jsonl", "part-000001.jsonl"]
        and not (tmp_path / "nouns.jsonl").exists()
    )
    (tmp_path / "parts" / "part-000002.jsonl.tmp999").write_text('{"half a li')  # a write cut short
    resumed = CrashingExtractor(0, mode="chunk")
    summary = run_nouns_job(captions, resumed, tmp_path, chunk_size=10, progress=False)
    assert summary["complete"] and summary["chunks_run"] == 3 and resumed.calls == 3
    assert not list((tmp_path / "parts").glob("*.tmp*"))
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
    assert (out / "problems.txt").read_text() == f"{table}:3: expected 2 fields, got 1\n"
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
    return run_pairs_job(
        reference_nouns / "nouns.jsonl",
        proposals,
        clf,
        out,
        {"proposals": "gt"},
        crops=True,
        batch_size=4,
        chunk_size=12,
        progress=False,
        **kw,
    )


def test_pairs_resume_shards_and_registration(reference_nouns, crop_classifier, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ov_seg.data.dataset_mappers.mask_category import MaskCategoryDatasetMapper
    from ov_seg.data.datasets.register_mined import register_mined_pairs

    gt = GroundTruthProposals("toyworld_panoptic_train")
    ref = tmp_path / "ref"
    s = _pairs(reference_nouns, gt, crop_classifier, ref)
    assert s["complete"] and s["num_images"] == 48 and s["num_pairs"] > 48
    coco = json.loads((ref / "pairs.json").read_text())
    ann = coco["annotations"][0]
    assert {
        "segmentation",
        "category",
        "category_id",
        "score",
        "image_id",
        "proposal_category",
    } <= set(ann)
    assert (ref / ann["crop"] if "crop" in ann else ref / "crops.tsv").exists()

    killed = tmp_path / "killed"  # a run stopped after 2 of 4 chunks, then resumed
    assert not _pairs(reference_nouns, gt, crop_classifier, killed, max_chunks=2)["complete"]
    assert _pairs(reference_nouns, gt, crop_classifier, killed)["chunks_run"] == 2
    _same_files(killed, ref, PAIR_OUTPUTS)

    dirs = [tmp_path / f"s{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        _pairs(reference_nouns, gt, crop_classifier, d, shard=(i, 2))
    finalize_pairs(dirs, tmp_path / "merged")
    for name in ("pairs.json", "vocab.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (ref / name).read_bytes()
    tsv = (tmp_path / "merged" / "crops.tsv").read_text().splitlines()
    assert tsv[0] == "filepath\ttitle" and all(
        (tmp_path / "merged" / r.split("\t")[0]).is_file() for r in tsv[1:]
    )

    register_mined_pairs("test_mined_pairs", ref / "pairs.json")
    dicts = DatasetCatalog.get("test_mined_pairs")
    assert MetadataCatalog.get("test_mined_pairs").stuff_classes == sorted(
        {a["category"] for a in coco["annotations"]}
    )
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
    assert (x["category_ids"] >= 0).all()
