"""Dataset evaluation throughput: detectron2's ``inference_on_dataset`` of a config's model over a
registered dataset through the project's test loader and evaluator (``Trainer.build_test_loader``
/ ``build_evaluator``), with timers around the loader iterator, the model call (forward hooks) and
the evaluator; images/s, s/image, the share of the wall time in each, peak RSS and how many times
the vocabulary's text embeddings were computed (``TextClassifier.encode_prompts`` calls: one per
dataset when the classifier's cache works)."""

import itertools
import tempfile
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Optional

import torch
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset

from ov_seg.benchmark.machine import peak_rss_mib
from ov_seg.benchmark.stats import per_item_ms, rate, share
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine.trainer import Trainer
from ov_seg.modeling.clip.text_classifier import TextClassifier
from ov_seg.utils.threads import test_loader_workers


class _Seconds:
    """Accumulated seconds of named parts."""

    def __init__(self):
        self.s: Dict[str, float] = {"data": 0.0, "model": 0.0, "evaluator": 0.0}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] += time.perf_counter() - t0


class TimedLoader:
    """The first ``limit`` batches of ``loader`` (0 = all), the time spent waiting for each counted
    as data time."""

    def __init__(self, loader, seconds: _Seconds, limit: int = 0):
        self.loader = loader
        self.seconds = seconds
        self.limit = limit
        self.images = 0
        self.first_batch_s = 0.0

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.limit) if self.limit > 0 else n

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(len(self)) if self.limit > 0 else itertools.count():
            t0 = time.perf_counter()
            with self.seconds("data"):
                batch = next(it, None)
            if not self.images:
                self.first_batch_s = time.perf_counter() - t0
            if batch is None:
                return
            self.images += len(batch)
            yield batch


class TimedEvaluator(DatasetEvaluator):
    """``evaluator`` with its ``reset`` / ``process`` / ``evaluate`` counted as evaluator time."""

    def __init__(self, evaluator: DatasetEvaluator, seconds: _Seconds):
        self.evaluator = evaluator
        self.seconds = seconds

    def reset(self):
        with self.seconds("evaluator"):
            self.evaluator.reset()

    def process(self, inputs, outputs):
        with self.seconds("evaluator"):
            self.evaluator.process(inputs, outputs)

    def evaluate(self):
        with self.seconds("evaluator"):
            return self.evaluator.evaluate()


@contextmanager
def timed_model(model: torch.nn.Module, seconds: _Seconds):
    """Model-call time from forward pre- / post-hooks on ``model`` (its own forward runs)."""
    start = []

    def pre(module, args):
        start.append(time.perf_counter())

    def post(module, args, output):
        seconds.s["model"] += time.perf_counter() - start.pop()

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def counted_text_encodings(model: torch.nn.Module, counts: Dict[str, int]):
    """Count the calls of ``encode_prompts`` of every ``TextClassifier`` in ``model`` (the text
    tower runs only there) in ``counts["text_encodings"]``, their caches emptied first."""
    classifiers = [m for m in model.modules() if isinstance(m, TextClassifier)]
    counts.setdefault("text_encodings", 0)

    def wrap(fn):
        def encode_prompts(names):
            counts["text_encodings"] += 1
            return fn(names)

        return encode_prompts

    for c in classifiers:
        c.clear_cache()
        c.encode_prompts = wrap(c.encode_prompts)
    try:
        yield classifiers
    finally:
        for c in classifiers:
            del c.encode_prompts


def build_model(cfg) -> torch.nn.Module:
    """The config's model in eval mode with ``MODEL.WEIGHTS`` loaded when given (as train_net's
    ``--eval-only``)."""
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def benchmark_dataset(
    cfg,
    model: torch.nn.Module,
    dataset_name: str = "",
    limit: int = 0,
    output_folder: str = "",
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Evaluate ``model`` on ``dataset_name`` (default ``cfg.DATASETS.TEST[0]``; the first
    ``limit`` batches, 0 = all) as ``Trainer.test`` does, timed.

    Returns:
        dict: dataset, images, loader workers, wall seconds, images/s, ms/image, seconds and share
        of the wall time in data loading / model / evaluator (shares sum to <= 1: the rest is
        inference_on_dataset's own bookkeeping), the wait for the first batch (loader workers
        starting, included in the data seconds), text encodings, peak RSS (MiB, this process), and
        the evaluator's results.
    """
    if not dataset_name and not cfg.DATASETS.TEST:
        raise ValueError("no dataset: name one (the config's DATASETS.TEST is empty)")
    dataset_name = dataset_name or cfg.DATASETS.TEST[0]
    seconds = _Seconds()
    counts: Dict[str, int] = {}
    loader = TimedLoader(Trainer.build_test_loader(cfg, dataset_name), seconds, limit)
    with ExitStack() as stack:
        if not output_folder:
            output_folder = stack.enter_context(tempfile.TemporaryDirectory())
        evaluator = TimedEvaluator(
            Trainer.build_evaluator(cfg, dataset_name, output_folder), seconds
        )
        stack.enter_context(timed_model(model, seconds))
        stack.enter_context(counted_text_encodings(model, counts))
        t0 = time.perf_counter()
        results = inference_on_dataset(model, loader, evaluator)
        wall = time.perf_counter() - t0
    out = {
        "dataset": dataset_name,
        "images": loader.images,
        "loader_workers": test_loader_workers(cfg),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 3),
        "images_per_s": round(rate(loader.images, wall), 3),
        "ms_per_image": round(per_item_ms(wall, loader.images), 2),
        "seconds": {k: round(v, 3) for k, v in seconds.s.items()},
        "first_batch_s": round(loader.first_batch_s, 3),
        "share": {k: share(v, wall) for k, v in seconds.s.items()},
        "text_encodings": counts["text_encodings"],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "results": results,
    }
    if log is not None:
        log(
            f"{dataset_name}: {out['images']} images, {out['loader_workers']} loader worker(s), "
            f"{out['threads']} thread(s): {out['images_per_s']} images/s, "
            f"{out['ms_per_image']} ms/image; data {100 * out['share']['data']:.1f}% model "
            f"{100 * out['share']['model']:.1f}% evaluator {100 * out['share']['evaluator']:.1f}%; "
            f"text encodings {out['text_encodings']}; peak RSS {out['peak_rss_mib']} MiB"
        )
    return out
