"""MixReorg cost (``tools/benchmark.py mixreorg``): fvcore FLOPs (multiply-adds, attention included:
``ov_seg.utils.flops``) of inference (mixed vs unmixed model) and of the training branches, and the
wall time of a training step and of inference, with and without mixing."""

import time

import torch

from ov_seg.modeling.losses.mixing import make_mix_plan
from ov_seg.modeling.meta_arch.mixreorg import MixReorg
from ov_seg.utils.flops import count_flops

__all__ = ["benchmark_mixreorg"]


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


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def benchmark_mixreorg(cfg, batch_size: int = 32, image_size: int = 64, iters: int = 3) -> dict:
    """A MixReorg of ``cfg`` with and without ``MODEL.MIXREORG.MIXING`` (same seed) on random
    images of ``image_size``: inference of one image, training branches and a training step of
    ``batch_size`` images.

    Returns:
        {batch_size, image_size, classes, inference_gflops_{mixed,unmixed} (one image),
        inference_s_*, train_encoder_gflops_* (the batch), train_step_s_*, threads}.
    """
    torch.manual_seed(0)
    models = {}
    for mixing in (True, False):
        c = cfg.clone()
        c.defrost()
        c.MODEL.MIXREORG.MIXING = mixing
        c.freeze()
        models[mixing] = MixReorg(c).to(cfg.MODEL.DEVICE)
    model = models[True]
    size, b = image_size, batch_size
    images = torch.randn(b, 3, size, size, device=model.device)
    vocab = model.default_vocabulary or [f"class {i}" for i in range(20)]
    embeds = model.class_embeddings(vocab)
    result = {"batch_size": b, "image_size": size, "classes": len(vocab)}
    with torch.no_grad():
        for mixing, m in models.items():
            m.eval()
            key = "mixed" if mixing else "unmixed"
            result[f"inference_gflops_{key}"] = (
                count_flops(_Inference(m, embeds), (images[0],)) / 1e9
            )
            result[f"inference_s_{key}"] = _time(lambda: m.segment_scores(images[0], embeds), iters)
        for mixing in (True, False):
            key = "mixed" if mixing else "unmixed"
            result[f"train_encoder_gflops_{key}"] = (
                count_flops(_Branches(model, mixing), (images,)) / 1e9
            )
    texts = model.text_classifier.encode_texts([f"a photo of a thing {i}" for i in range(b)])
    for mixing, m in models.items():
        m.train()

        def step(m=m):
            losses = m.branch_losses(images, texts)
            sum(losses.values()).backward()
            for p in m.parameters():
                p.grad = None

        result[f"train_step_s_{'mixed' if mixing else 'unmixed'}"] = _time(step, iters)
    result["threads"] = torch.get_num_threads()
    return result
