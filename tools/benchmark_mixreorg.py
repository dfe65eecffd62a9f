#!/usr/bin/env python
"""MixReorg cost: fvcore FLOPs (multiply-adds, attention included: ``ov_seg.utils.flops``) of
inference (mixed vs unmixed model) and of the training branches, and the wall time of a training
step and of inference, with and without mixing. Prints one JSON line.

    python tools/benchmark_mixreorg.py --config-file configs/toyworld/mixreorg.yaml --batch-size 128
    python tools/benchmark_mixreorg.py --config-file configs/mixreorg/mixreorg_vit_b16_coco.yaml \
        --batch-size 8 --image-size 224 MODEL.CLIP.PRETRAINED ""
"""

import json
import time

import torch
from detectron2.engine import default_argument_parser

from ov_seg.engine.setup import setup_cfg
from ov_seg.modeling.losses.mixing import make_mix_plan
from ov_seg.modeling.meta_arch.mixreorg import MixReorg
from ov_seg.utils.flops import count_flops


class _Inference(torch.nn.Module):
    def __init__(self, model, class_embeds):
        super().__init__()
        self.model, self.class_embeds = model, class_embeds

    def forward(self, image):
        return self.model.segment_scores(image, self.class_embeds)


class _Branches(torch.nn.Module):
    def __init__(self, model, mixing):
        super().__init__()
        self.model, self.mixing = model, mixing

    def forward(self, images):
        grid = [s // self.model.encoder.patch_size for s in images.shape[-2:]]
        plan = make_mix_plan(images.shape[0], grid, num_mix=self.model.num_mix_images)
        outs = self.model.branch_outputs(images, plan if self.mixing else None)
        return tuple(o["segments"] for o in outs.values())


def _flops(module, inputs) -> int:
    """fvcore multiply-adds, attention included (``ov_seg.utils.flops``)."""
    return count_flops(module, inputs)


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = setup_cfg(args, default_setup_enabled=False)
    torch.manual_seed(0)
    models = {}
    for mixing in (True, False):
        c = cfg.clone()
        c.defrost()
        c.MODEL.MIXREORG.MIXING = mixing
        c.freeze()
        models[mixing] = MixReorg(c).to(cfg.MODEL.DEVICE)
    model = models[True]
    size, b = args.image_size, args.batch_size
    images = torch.randn(b, 3, size, size, device=model.device)
    vocab = model.default_vocabulary or [f"class {i}" for i in range(20)]
    embeds = model.class_embeddings(vocab)
    result = {
        "config": args.config_file,
        "batch_size": b,
        "image_size": size,
        "classes": len(vocab),
    }
    with torch.no_grad():
        for mixing, m in models.items():
            m.eval()
            key = "mixed" if mixing else "unmixed"
            result[f"inference_gflops_{key}"] = _flops(_Inference(m, embeds), (images[0],)) / 1e9
            result[f"inference_s_{key}"] = _time(
                lambda: m.segment_scores(images[0], embeds), args.iters
            )
        for mixing in (True, False):
            key = "mixed" if mixing else "unmixed"
            result[f"train_encoder_gflops_{key}"] = (
                _flops(_Branches(model, mixing), (images,)) / 1e9
            )
    texts = model.text_classifier.encode_texts([f"a photo of a thing {i}" for i in range(b)])
    for mixing, m in models.items():
        m.train()

        def step(m=m):
            losses = m.branch_losses(images, texts)
            sum(losses.values()).backward()
            for p in m.parameters():
                p.grad = None

        result[f"train_step_s_{'mixed' if mixing else 'unmixed'}"] = _time(step, args.iters)
    result["threads"] = torch.get_num_threads()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
