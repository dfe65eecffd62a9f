"""The text tower of an open_clip model: its modules and parameters (``CLIP`` keeps them on the
model itself, ``CustomTextCLIP`` in ``model.text``).

Shared by the text classifier (eval mode, freezing) and the text-embedding cache (weights hash);
neither imports the other for it.
"""

from typing import List

from torch import nn

__all__ = ["text_tower_modules", "text_tower_parameters"]


def text_tower_modules(clip_model: nn.Module) -> List[nn.Module]:
    """The modules of an open_clip model's text tower (``CLIP`` or ``CustomTextCLIP``)."""
    text = getattr(clip_model, "text", None)
    if isinstance(text, nn.Module):
        return [text]
    return [clip_model.token_embedding, clip_model.transformer, clip_model.ln_final]


def text_tower_parameters(clip_model: nn.Module) -> List[nn.Parameter]:
    """Parameters of an open_clip model's text tower (modules, positional embedding, projection)."""
    params = [p for m in text_tower_modules(clip_model) for p in m.parameters()]
    for name in ("positional_embedding", "text_projection"):
        value = getattr(clip_model, name, None)
        if isinstance(value, nn.Parameter):
            params.append(value)
        elif isinstance(value, nn.Module):
            params.extend(value.parameters())
    return params
