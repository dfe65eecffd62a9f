"""``NAME=CONFIG:WEIGHTS:OPTS`` method specs: the models a tool compares side by side
(``tools/visualize_methods.py``, ``tools/search_calibration.py``)."""

import argparse
import shlex
from typing import List, Tuple

from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine.trainer import Trainer

__all__ = ["parse_method_spec", "build_method"]


def parse_method_spec(text: str) -> Tuple[str, str, str, List[str]]:
    """ "NAME=CONFIG:WEIGHTS:OPTS" → (name, config, weights, [opts]); WEIGHTS may be empty, OPTS
    are split like a shell command line (quote an empty value: ``MODEL.CLIP.PRETRAINED ''``).

    Raises:
        argparse.ArgumentTypeError: no "=", or an empty name or config.
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--method must be NAME=CONFIG:WEIGHTS:OPTS, got {text!r}")
    name, rest = text.split("=", 1)
    config, weights, opts = (rest.split(":", 2) + ["", ""])[:3]
    if not name or not config:
        raise argparse.ArgumentTypeError(f"--method needs a name and a config: {text!r}")
    return name, config, weights, shlex.split(opts)


def build_method(base_cfg, config: str, weights: str, opts: List[str]):
    """(frozen cfg, model in eval mode with ``weights`` loaded, if any) of one method spec."""
    cfg = base_cfg.clone()
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    model = Trainer.build_model(cfg)
    if weights:
        SafeCheckpointer(model).load(weights)
    return cfg, model.eval()
