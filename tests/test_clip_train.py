"""CLIP training models on the tiny toy world: mappers, CLIPPretrain / MaskAdaptedCLIP through
train_net, export, MPT gradients."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from helpers import REPO, load_train_net, run_train_net, setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.data.datasets.register_captions import load_caption_csv, register_caption_csv
from ov_seg.engine import Trainer
from ov_seg.modeling.clip import build_clip, load_mask_prompts

SMALL = ["SOLVER.IMS_PER_BATCH", "8", "SOLVER.WARMUP_ITERS", "1", "RUNTIME.NUM_THREADS", "1"]


@pytest.fixture(scope="module")
def pretrained(toyworld_root, tmp_path_factory):
    """A CLIPPretrain run of 3 iterations, then its evaluation (train_net --eval-only)."""
    out = tmp_path_factory.mktemp("clip_pretrain")
    config = str(REPO / "configs/toyworld/clip_pretrain.yaml")
    run_train_net(
        [
            "--config-file",
            config,
            "OUTPUT_DIR",
            str(out),
            "SOLVER.MAX_ITER",
            "3",
            "DATASETS.TEST",
            "()",
            *SMALL,
        ]
    )
    results = run_train_net(
        [
            "--config-file",
            config,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "OUTPUT_DIR",
            str(out / "eval"),
            *SMALL,
        ]
    )
    return out, results


def test_caption_mapper(toyworld_root):
    cfg = setup_config("configs/toyworld/clip_pretrain.yaml")
    d = DatasetCatalog.get("toyworld_captions_web")[0]
    x = build_dataset_mapper(cfg, True, "toyworld_captions_web")(d)
    assert x["image"].shape == (3, 64, 64) and x["image"].dtype == torch.uint8
    assert x["captions"] == d["captions"] and len(x["hard_negatives"]) == len(d["captions"])
    assert x["vocabulary"][0] == "grass"


def test_mask_category_mapper_sources(toyworld_root, tmp_path):
    cfg = setup_config("configs/toyworld/clip_mpt.yaml", ["INPUT.MASK_CATEGORY.MIN_AREA", "1"])
    pan = DatasetCatalog.get("toyworld_panoptic_val")[0]
    mapper = build_dataset_mapper(cfg, False, "toyworld_panoptic_val")
    x = mapper(pan)
    segs = pan["segments_info"]
    assert x["masks"].shape[0] == len(segs) and x["masks"].dtype == torch.bool
    assert x["category_ids"].tolist() == [s["category_id"] for s in segs]
    assert x["categories"] == [x["vocabulary"][s["category_id"]] for s in segs]
    # masks partition the labelled pixels: no overlap
    assert int(x["masks"].sum(0).max()) <= 1
    # mined pairs: RLE + free-text category names
    m = np.zeros((64, 64), dtype=np.uint8, order="F")
    m[10:30, 5:25] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode()
    mined = {
        **pan,
        "pairs": [
            {"segmentation": rle, "category": "odd blob"},
            {"segmentation": [[40, 40, 60, 40, 60, 60, 40, 60]], "category": "red star"},
        ],
    }
    y = mapper(mined)
    assert y["categories"] == ["odd blob", "red star"]
    assert y["category_ids"].tolist() == [-1, x["vocabulary"].index("red star")]
    assert torch.equal(y["masks"][0], torch.from_numpy(m.astype(bool)))


def test_register_caption_csv(tmp_path):
    csv_path = tmp_path / "caps.tsv"
    csv_path.write_text("filepath\ttitle\na.png\ta red star\nb.png\tsky\na.png\tanother caption\n")
    dicts = load_caption_csv(str(csv_path), str(tmp_path))
    assert [d["captions"] for d in dicts] == [["a red star", "another caption"], ["sky"]]
    assert dicts[0]["file_name"] == str(tmp_path / "a.png")
    register_caption_csv("test_caption_csv", str(csv_path), str(tmp_path))
    assert len(DatasetCatalog.get("test_caption_csv")) == 2
    with pytest.raises(KeyError, match="caption_text"):
        load_caption_csv(str(csv_path), caption_key="caption_text")


def test_clip_pretrain_train_eval_export(pretrained, toyworld_root):
    out, results = pretrained
    metrics = results["mask_cls"]  # one test dataset: detectron2 returns its results directly
    assert metrics["num_segments"] > 0
    # every unseen class is a thing: the probe's top-1 on unseen objects is the same number
    assert results["probe"]["top1_unseen"] == pytest.approx(metrics["acc_unseen"])
    s, u = metrics["acc_seen"], metrics["acc_unseen"]
    assert metrics["harmonic"] == pytest.approx(2 * s * u / (s + u) if s + u else 0.0)
    assert metrics["chance"] == pytest.approx(100 / 69)
    # model_final.pth is itself loadable as a plain CLIP; the export tool writes clip_export.pth
    final = build_clip("ovseg-tiny-vit8-64", str(out / "model_final.pth"))
    load_train_net()  # tools importable
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_clip", REPO / "tools" / "export_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.add_argument("--output", default="")
    path = mod.main(
        parser.parse_args(
            [
                "--config-file",
                str(REPO / "configs/toyworld/clip_pretrain.yaml"),
                "OUTPUT_DIR",
                str(out),
            ]
        )
    )
    exported = build_clip("ovseg-tiny-vit8-64", path)
    for (k, a), (_, b) in zip(final.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), k
    # the trained text embedding table differs from a fresh random init only on the compact rows
    assert load_mask_prompts(path) is None


def test_mask_adapted_clip_mpt_only_prompts_train(pretrained, toyworld_root, tmp_path):
    out, _ = pretrained
    export = str(out / "clip_export.pth")
    if not (out / "clip_export.pth").is_file():
        pytest.skip("export test did not run")
    cfg = setup_config(
        "configs/toyworld/clip_mpt.yaml",
        ["MODEL.CLIP.PRETRAINED", export, "OUTPUT_DIR", str(tmp_path), *SMALL],
    )
    # the classification loss trains the prompts only; OVSeg's loss (the toy config's) also the
    # CLIP's logit scale of its symmetric contrastive loss
    plain = setup_config(
        "configs/toyworld/clip_mpt.yaml",
        ["MODEL.CLIP.PRETRAINED", export, "MODEL.MASK_ADAPTED_CLIP.LOSS", "classification", *SMALL],
    )
    trainable = {n for n, p in Trainer.build_model(plain).named_parameters() if p.requires_grad}
    assert trainable == {"crop_classifier.encoder.prompts"}
    assert cfg.MODEL.MASK_ADAPTED_CLIP.LOSS == "ovseg"
    model = Trainer.build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"crop_classifier.encoder.prompts", "clip.logit_scale"}
    mapper = build_dataset_mapper(cfg, True, "toyworld_panoptic_train")
    inputs = [mapper(d) for d in DatasetCatalog.get("toyworld_panoptic_train")[:4]]
    model.train()
    with EventStorage():
        losses = model(inputs)
    losses["loss_mask_cls"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"crop_classifier.encoder.prompts", "clip.logit_scale"}
    assert grads["crop_classifier.encoder.prompts"].abs().sum() > 0
    assert all(p.grad is None for n, p in model.clip.named_parameters() if n != "logit_scale")
    # eval mode gives one row of logits per ground-truth segment
    model.eval()
    eval_mapper = build_dataset_mapper(cfg, False, "toyworld_panoptic_val")
    x = eval_mapper(DatasetCatalog.get("toyworld_panoptic_val")[0])
    res = model([x])[0]["mask_cls"]
    assert res["logits"].shape == (x["masks"].shape[0], 69)


def test_mask_adapted_clip_runs_and_exports(pretrained, toyworld_root, tmp_path):
    out, _ = pretrained
    export = out / "clip_export.pth"
    if not export.is_file():
        pytest.skip("export test did not run")
    run_train_net(
        [
            "--config-file",
            str(REPO / "configs/toyworld/clip_mpt.yaml"),
            "OUTPUT_DIR",
            str(tmp_path),
            "MODEL.CLIP.PRETRAINED",
            str(export),
            "SOLVER.MAX_ITER",
            "2",
            "DATASETS.TEST",
            "()",
            *SMALL,
        ]
    )
    cfg = setup_config(
        "configs/toyworld/clip_mpt.yaml",
        ["MODEL.CLIP.PRETRAINED", str(export), "OUTPUT_DIR", str(tmp_path)],
    )
    from ov_seg.checkpoint import SafeCheckpointer
    from ov_seg.modeling.clip.export import export_clip

    model = Trainer.build_model(cfg)
    initial_prompts = model.crop_classifier.encoder.prompts.detach().clone()
    SafeCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    path = export_clip(model, str(tmp_path / "clip_export.pth"))
    prompts = load_mask_prompts(path)
    depth = cfg.MODEL.CLIP.MASK_PROMPT_DEPTH
    assert prompts.shape == (depth, 64, 64) and not torch.equal(prompts, initial_prompts)
    # MPT leaves every CLIP weight as it was (OVSeg's loss trains the logit scale only)
    before = build_clip("ovseg-tiny-vit8-64", str(export)).state_dict()
    after = build_clip("ovseg-tiny-vit8-64", path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "logit_scale")
    # a model built from the adapted export picks up its prompts
    cfg2 = setup_config("configs/toyworld/clip_mpt.yaml", ["MODEL.CLIP.PRETRAINED", path])
    assert torch.equal(Trainer.build_model(cfg2).crop_classifier.encoder.prompts.detach(), prompts)
    json.dumps({k: float(v.float().sum()) for k, v in after.items()})  # finite, serialisable


def test_register_caption_csv_flickr8k(shared_dir):
    """The shared Flickr8k subset (``image,caption`` CSV) as a caption dataset, through the
    mapper."""
    root = shared_dir / "data" / "flickr8k_subset1000"
    if not (root / "captions.csv").is_file():
        pytest.skip("flickr8k subset absent")
    register_caption_csv(
        "test_flickr8k", str(root / "captions.csv"), str(root / "images"), ",", "image", "caption"
    )
    dicts = DatasetCatalog.get("test_flickr8k")
    assert len(dicts) == 1000 and all(len(d["captions"]) == 5 for d in dicts)
    cfg = setup_config("configs/toyworld/clip_pretrain.yaml")
    x = build_dataset_mapper(cfg, True, "test_flickr8k")(dicts[0])
    assert x["image"].shape[0] == 3 and max(x["image"].shape[1:]) == 64  # INPUT.MAX_SIZE_TRAIN 64
    assert x["captions"] == dicts[0]["captions"] and x["hard_negatives"] == []


@pytest.mark.parametrize("mode", ["ft", "ft_mpt"])
def test_mask_adapted_clip_modes(mode, tmp_path):
    cfg = setup_config(
        "configs/toyworld/clip_mpt.yaml",
        ["MODEL.MASK_ADAPTED_CLIP.MODE", mode, "OUTPUT_DIR", str(tmp_path)],
    )
    model = Trainer.build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    visual = {f"clip.{n}" for n, _ in model.clip.visual.named_parameters(prefix="visual")}
    expected = visual | ({"crop_classifier.encoder.prompts"} if mode == "ft_mpt" else set())
    # OVSeg's loss (the toy config's) trains the CLIP's logit scale too
    expected |= {"clip.logit_scale"} if cfg.MODEL.MASK_ADAPTED_CLIP.LOSS == "ovseg" else set()
    assert trainable == expected
    assert (model.crop_classifier.encoder.depth == 0) == (mode == "ft")


def test_mask_adapted_clip_trains_at_several_crop_sizes(toyworld_root, tmp_path):
    """TRAIN_CROP_SIZES: each step's crops have one of the sizes, gradients reach the prompts and
    the (interpolated) positional embedding, and evaluation stays at the CLIP's input size."""
    sizes = [24, 40]
    cfg = setup_config(
        "configs/toyworld/clip_mpt.yaml",
        [
            "MODEL.MASK_ADAPTED_CLIP.MODE",
            "ft_mpt",
            "MODEL.MASK_ADAPTED_CLIP.TRAIN_CROP_SIZES",
            str(sizes),
            "OUTPUT_DIR",
            str(tmp_path),
            *SMALL,
        ],
    )
    model = Trainer.build_model(cfg)
    mapper = build_dataset_mapper(cfg, True, "toyworld_panoptic_train")
    inputs = [mapper(d) for d in DatasetCatalog.get("toyworld_panoptic_train")[:4]]
    images = [x["image"] for x in inputs]
    masks = [x["masks"] for x in inputs]
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        crops, crop_masks, _ = model.crop_training_batch(images, masks)
        assert crops.shape[-1] in sizes and crop_masks.shape[-2:] == crops.shape[-2:]
        seen.add(crops.shape[-1])
    assert seen == set(sizes) and model.crop_classifier.crop_size == 64
    model.train()
    with EventStorage():
        losses = model(inputs)
    losses["loss_mask_cls"].backward()
    assert model.crop_classifier.encoder.prompts.grad.abs().sum() > 0
    assert model.clip.visual.positional_embedding.grad.abs().sum() > 0
    assert model.crop_classifier.crop_size == 64
    with pytest.raises(ValueError, match="TRAIN_CROP_SIZES"):
        bad = setup_config(
            "configs/toyworld/clip_mpt.yaml", ["MODEL.MASK_ADAPTED_CLIP.TRAIN_CROP_SIZES", "[30]"]
        )
        Trainer.build_model(bad)
