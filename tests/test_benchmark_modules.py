"""ov_seg.benchmark's measuring modules on tiny models (random weights, the toy world): the
structure of the returned numbers and the relations between them (counts, sums, FLOPs), never the
timings."""

import pytest
import torch
from helpers import ONE_THREAD, REPO, setup_config

from ov_seg.benchmark.stats import gflops_per_s, rate, share, weighted_flops
from ov_seg.modeling.fusion import with_background_name

TWO_STAGE = str(REPO / "configs/toyworld/two_stage_R18.yaml")
TINY = ["MODEL.CLIP.PRETRAINED", "", "MODEL.WEIGHTS", "", *ONE_THREAD]
TEST_NONE = [*TINY, "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def two_stage(toyworld_root):
    from ov_seg.benchmark.two_stage import build_two_stage

    torch.manual_seed(0)
    cfg, model, threads, build_s = build_two_stage(TWO_STAGE, 6, TINY)
    assert threads == 1 and build_s > 0 and cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 6
    return cfg, model


def test_two_stage_stages_counts_and_flops(two_stage):
    from ov_seg.benchmark.two_stage import STAGES, benchmark_two_stage

    cfg, model = two_stage
    lines = []
    r = benchmark_two_stage(
        cfg, model, (48, 40), vocabulary_size=4, iters=2, warmup=1, log=lines.append
    )
    assert len(lines) == 2 and r["image"] == "48x40" and r["proposals"] == 6
    assert r["synthetic_masks"] and not r["plain"]  # no trained weights: random blobs
    names = [f"class {i}" for i in range(4)]
    assert r["vocabulary"] == len(with_background_name(names, model.background_name))
    templates = model.crop_classifier.text_classifier.templates
    assert r["text_prompts"] == r["vocabulary"] * len(templates)
    assert {"text_cold_s", "text_disk_s", "text_memory_ms"} <= set(r)
    assert set(r["ms_per_image"]) == set(STAGES)
    assert all(v >= 0 for v in r["ms_per_image"].values())
    runs = r["end_to_end_runs_ms"]
    assert len(runs) == 2 and min(runs) <= r["end_to_end_ms"] <= max(runs)
    # what was encoded: at most the proposals, each crop of some size
    assert 0 < r["crops_encoded"] <= r["masks_encoded"] <= r["proposals_kept"] <= 6
    assert sum(r["crops_by_size"].values()) == r["crops_encoded"]
    # FLOPs: per crop size x crops of that size (stats.weighted_flops)
    gflop = weighted_flops(r["clip_flops_per_crop"], r["crops_by_size"]) / 1e9
    assert r["clip_gflop"] == round(gflop, 2)
    assert r["clip_executed_gflop"] <= r["clip_gflop"]
    assert r["crops_per_s"] > 0  # (from the unrounded stage medians)
    assert set(r["load"]) >= {"wall_s", "own_cpu_cores", "loadavg_before", "loadavg_after"}
    assert r["peak_rss_mib"] > 0


def test_two_stage_flops_per_crop_scale_with_the_tokens(two_stage):
    """The tower's FLOPs grow with the crop side (more patches), the executed ones never exceed the
    nominal ones."""
    from ov_seg.benchmark.two_stage import clip_flops_per_crop

    _, model = two_stage
    size = model.crop_classifier.crop_size
    nominal = clip_flops_per_crop(model, size)
    assert 0 < clip_flops_per_crop(model, size, executed=True) <= nominal
    assert clip_flops_per_crop(model, 2 * size) > nominal


def test_two_stage_text_only_and_memory(two_stage):
    from ov_seg.benchmark.two_stage import benchmark_two_stage, memory_benchmark

    cfg, model = two_stage
    r = benchmark_two_stage(cfg, model, (32, 32), vocabulary_size=3, text_only=True, skip_text=True)
    assert "text_memory_ms" in r and "text_cold_s" not in r and "ms_per_image" not in r
    m = memory_benchmark(cfg, model, ["40x32", "32x24"], vocabulary_size=3, iters=2, warmup=0)
    assert m["names"] == 3 and list(m["photos"]) == ["40x32", "32x24"]
    for size, p in m["photos"].items():
        assert len(p["runs_s"]) == 2 and p["sem_seg"] in ("labels", "dense scores")
        assert min(p["runs_s"]) <= p["s_per_photo"] <= max(p["runs_s"])
    assert m["photos"]["40x32"]["megapixels"] == round(40 * 32 / 1e6, 2)


def test_clip_model_rates_follow_from_its_times():
    from ov_seg.benchmark.clip import bench_clip_model

    r = bench_clip_model("ovseg-tiny-vit8-64", crops=3, repeats=1, image_size=32, depth=1)
    assert r["model"] == "ovseg-tiny-vit8-64" and r["crop_size"] == 64
    assert 0 < r["crops"] <= 3 and 0 <= r["prep_fraction"] <= 1
    assert r["crops_per_s"] == pytest.approx(rate(r["crops"], r["prep_s"] + r["clip_s"]))
    assert r["prep_fraction"] == pytest.approx(share(r["prep_s"], r["prep_s"] + r["clip_s"]))
    assert r["clip_gflops_per_s"] == pytest.approx(gflops_per_s(r["clip_gflop"] * 1e9, r["clip_s"]))
    assert r["clip_gflop"] > 0


def test_clip_options_variants():
    from ov_seg.benchmark.clip_options import benchmark_clip_options

    threads = torch.get_num_threads()
    out = benchmark_clip_options(
        "ovseg-tiny-vit8-64", crops=2, repeats=1, threads=[1], batch_sizes=[1], matmul_n=64
    )
    assert torch.get_num_threads() == threads
    names = [v["variant"] for v in out["variants"]]
    # threads x no_grad, inference_mode, one per batch size, channels-last, strided, SDPA
    assert len(names) == 6 == len(set(names)) and out["crops"] == 2 and out["gflop_per_crop"] > 0
    for v in out["variants"]:
        assert v["threads"] == 1
        assert v["crops_per_s"] * v["s_per_crop"] == pytest.approx(1.0)
        assert v["fraction_of_matmul"] == pytest.approx(
            v["gflops_per_s"] / v["matmul_gflops_per_s"]
        )


def test_mixreorg_flops_and_times(toyworld_root):
    from ov_seg.benchmark.mixreorg import benchmark_mixreorg

    cfg = setup_config("configs/toyworld/mixreorg.yaml", ["MODEL.CLIP.PRETRAINED", ""])
    r = benchmark_mixreorg(cfg, batch_size=2, image_size=32, iters=1)
    assert (r["batch_size"], r["image_size"], r["threads"]) == (2, 32, 1) and r["classes"] > 0
    for key in ("mixed", "unmixed"):
        assert r[f"inference_gflops_{key}"] > 0 and r[f"train_step_s_{key}"] > 0
        # the training branches of 2 images cost more than inference of one
        assert r[f"train_encoder_gflops_{key}"] > r[f"inference_gflops_{key}"]


def test_pacl_measure_and_sweep(monkeypatch):
    from ov_seg.benchmark import pacl

    rows = [
        pacl.measure("loss", mode, 4, loss_sizes=(9, 16, 8), iters=1, chunk_size=2)
        for mode in ("chunked", "dense")
    ]
    for r, chunk, ckpt in zip(rows, (2, 0), (True, False)):
        assert (r["B"], r["pairs"], r["N"], r["d_v"], r["D"]) == (4, 16, 9, 16, 8)
        assert (r["chunk_size"], r["checkpoint"]) == (chunk, ckpt) and r["step_s"] > 0
    with pytest.raises(ValueError):
        pacl.measure("nothing", "dense", 2)
    # the sweep: every (B, mode), in that order, each isolated (here: in-process)
    seen = []
    monkeypatch.setattr(pacl, "measure_isolated", lambda timeout, **kw: pacl.measure(**kw))
    out = pacl.sweep(
        "loss", [2, 3], ["dense", "chunked"], on_row=seen.append, loss_sizes=[4, 8, 8], iters=1
    )
    assert [(r["B"], r["mode"]) for r in out] == [(2, "dense"), (2, "chunked"), (3, "dense")] + [
        (3, "chunked")
    ]
    assert seen == out
    text = pacl.table(out + [{"bench": "loss", "mode": "dense", "B": 9, "error": "boom"}])
    assert len(text.splitlines()) == 2 + 5 and text.splitlines()[-1].endswith("error: boom")


def test_proposals_benchmark(toyworld_root):
    from ov_seg.benchmark.proposals import benchmark_proposals, proposal_config

    cfg = proposal_config(str(REPO / "configs/toyworld/proposal_R18.yaml"), ONE_THREAD)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.CLIP.TEMPLATES == "single"
    r = benchmark_proposals(cfg, (32, 48), iters=1)
    assert r["image_size"] == [32, 48] and r["iters"] == 1 and r["threads"] == 1
    assert r["params_M"] > 0 and r["ms_per_image_wall"] > 0 and r["peak_rss_MB"] > 0
    with pytest.raises(ValueError):
        benchmark_proposals(cfg, (32, 48), iters=0)


def test_mining_nouns_and_pairs_counts(toyworld_root):
    pytest.importorskip("spacy")
    from ov_seg.benchmark.mining import caption_texts, nouns_throughput, pairs_throughput
    from ov_seg.engine.setup import get_ov_seg_cfg

    texts, images = caption_texts("toyworld_captions_web")
    assert images == 64 and len(texts) >= images
    texts = texts[:6]
    r = nouns_throughput(texts, n_process=1, batch_size=4, repeats=1, naive_captions=3)
    assert set(r) == {
        "naive",
        "parser_x1",
        "tagger_x1",
        "chunker_agreement",
        "vocabulary_size",
        "nouns_per_caption",
    }
    assert r["naive"]["captions"] == 3 and r["parser_x1"]["captions"] == 6
    assert r["tagger_x1"]["repeats"] == 1 and 0 <= r["chunker_agreement"] <= 1
    assert r["vocabulary_size"] > 0 and r["nouns_per_caption"] > 0
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(TWO_STAGE)
    cfg.merge_from_list(TINY)
    s = pairs_throughput(cfg, images=4, batch_size=2)
    assert (s["images"], s["proposals"]) == (4, "gt") and s["pairs"] > 0
    assert s["wall_images_per_s"] > 0 and s["cpu_images_per_s"] > 0


def test_dataset_evaluation_counts_and_shares(toyworld_root):
    from ov_seg.benchmark.dataset import benchmark_dataset, build_model
    from ov_seg.engine.trainer import Trainer

    cfg = setup_config("configs/toyworld/two_stage_R18.yaml", [*TINY, "TEST.NUM_WORKERS", "1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    lines = []
    r = benchmark_dataset(cfg, model, limit=3, log=lines.append)
    assert (r["dataset"], r["images"], r["loader_workers"]) == ("toyworld_sem_seg_val", 3, 1)
    assert Trainer.build_test_loader(cfg, r["dataset"]).loader.num_workers == 1  # TEST.NUM_WORKERS
    assert r["text_encodings"] == 1  # the vocabulary once per dataset, not once per image
    assert set(r["share"]) == {"data", "model", "evaluator"} and sum(r["share"].values()) <= 1
    assert all(v >= 0 for v in r["share"].values()) and r["share"]["model"] > 0
    assert 0 < r["first_batch_s"] <= r["seconds"]["data"] + 1e-3  # the first wait is data time
    assert r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 and "sem_seg" in r["results"]
    assert len(lines) == 1
    again = benchmark_dataset(cfg, model, "toyworld_sem_seg_val", limit=2)
    assert (again["images"], again["text_encodings"]) == (2, 1)  # a new pass: caches emptied
    with pytest.raises(ValueError, match="no dataset"):
        benchmark_dataset(setup_config("configs/toyworld/two_stage_R18.yaml", TEST_NONE), model)
