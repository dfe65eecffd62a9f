"""Convolution weights in the channels-last memory format (oneDNN's fast path on CPUs)."""

from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["convs_to_channels_last"]


def convs_to_channels_last(
    modules: Iterable[Optional[nn.Module]], exclude: Optional[nn.Module] = None
) -> None:
    """Convert, in place, the weights of every ``nn.Conv2d`` inside ``modules`` (None entries
    skipped) to the channels-last memory format, except the convolutions inside ``exclude`` (e.g.
    a CLIP shared with another part of the model). Values, names and shapes are unchanged:
    checkpoints load as before and keep the format (``load_state_dict`` copies in place)."""
    skip = {id(m) for m in exclude.modules()} if exclude is not None else set()
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in skip:
                m.to(memory_format=torch.channels_last)
