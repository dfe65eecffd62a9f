"""Modules of ``PACL``: patch embedders and a strided patch encoder.

Embedders map frozen CLIP patch tokens (B, N, d_v) into the joint space (B, N, D): ``residual_mlp``
is PACL's trainable vision embedder e_v; ``clip_projection`` is the vanilla-patch baseline (CLIP's
own visual projection applied to every patch token, nothing trained). ``StridedPatchEncoder`` runs
the CLIP image tower with a patch-embedding stride smaller than the patch size (the "conv" variant
of PACL's stride trick).
"""

from typing import Tuple

import torch
from torch import nn

from ov_seg.modeling.clip import MaskPromptVisionEncoder, VisionOutput
from ov_seg.utils.registry import NamedRegistry, get_registered

__all__ = [
    "PACL_EMBEDDER_REGISTRY",
    "build_pacl_embedder",
    "ResidualMLPEmbedder",
    "CLIPProjectionEmbedder",
    "StridedPatchEncoder",
]

PACL_EMBEDDER_REGISTRY = NamedRegistry("PACL_EMBEDDER")
PACL_EMBEDDER_REGISTRY.__doc__ = """
Registry of PACL patch embedders, chosen by ``MODEL.PACL.EMBEDDER``.
A registered class is called as ``cls(clip_model=..., hidden_dim=...)`` and maps patch tokens
(B, N, d_v), taken after the vision trunk's last LayerNorm, to embeddings (B, N, D) in CLIP's joint
space.
"""


def _visual_projection(visual: nn.Module) -> torch.Tensor:
    """The visual projection matrix (d_v, D) of an open_clip image tower."""
    proj = getattr(visual, "proj", None)
    if not isinstance(proj, torch.Tensor):
        raise ValueError(
            "the CLIP image tower has no visual projection matrix (visual.proj); PACL needs a "
            "VisionTransformer tower with a projection"
        )
    return proj


@PACL_EMBEDDER_REGISTRY.register("residual_mlp")
class ResidualMLPEmbedder(nn.Module):
    """PACL's vision embedder e_v(u) = W_s·u + W_2·ReLU(W_1·u), applied to every patch token.

    W_1: d_v → hidden, W_2: hidden → D, W_s: d_v → D, all with biases (ViT-B/16, hidden = D = 512:
    1.05 M parameters). Sizes are read from the CLIP model.
    """

    def __init__(self, *, clip_model: nn.Module, hidden_dim: int = 0):
        """
        Args:
            clip_model: the frozen open_clip model (only its sizes are read).
            hidden_dim: width of W_1 / W_2; <= 0 means D (the paper).
        """
        super().__init__()
        proj = _visual_projection(clip_model.visual)
        in_dim, out_dim = int(proj.shape[0]), int(proj.shape[1])
        hidden = hidden_dim if hidden_dim > 0 else out_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )
        self.shortcut = nn.Linear(in_dim, out_dim)

    @property
    def trainable(self) -> bool:
        """Whether training this embedder makes sense (it has parameters)."""
        return True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d_v) patch tokens → (B, N, D) patch embeddings."""
        return self.shortcut(tokens) + self.mlp(tokens)


@PACL_EMBEDDER_REGISTRY.register("clip_projection")
class CLIPProjectionEmbedder(nn.Module):
    """The vanilla-patch baseline: every patch token multiplied by CLIP's frozen visual projection.

    The projection is shared with the frozen CLIP model (not copied, not trained). With
    average-pooling towers the mean of these patch embeddings is exactly CLIP's image embedding.
    """

    def __init__(self, *, clip_model: nn.Module, hidden_dim: int = 0):
        """
        Args:
            clip_model: the frozen open_clip model whose ``visual.proj`` is used.
            hidden_dim: unused (kept for a uniform constructor).
        """
        super().__init__()
        self._visual = [clip_model.visual]  # a list: no second registration of the frozen tower

    @property
    def trainable(self) -> bool:
        return False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d_v) patch tokens → (B, N, D) projected tokens."""
        return tokens @ _visual_projection(self._visual[0])


def build_pacl_embedder(name: str, clip_model: nn.Module, hidden_dim: int = 0) -> nn.Module:
    """The embedder registered as ``name`` for ``clip_model``."""
    cls = get_registered(PACL_EMBEDDER_REGISTRY, name, "PACL embedder (MODEL.PACL.EMBEDDER)")
    return cls(clip_model=clip_model, hidden_dim=hidden_dim)


class StridedPatchEncoder(MaskPromptVisionEncoder):
    """The CLIP image tower with its patch embedding (``conv1``) applied at ``stride`` < patch size.

    Same weights as the tower; the token grid is ((H - p) // stride + 1, (W - p) // stride + 1) and
    the positional embedding is resized bicubically to it (``MaskPromptVisionEncoder`` handles any
    grid). Patches overlap, so the tower sees a token density it was not trained on. No mask
    prompts.

    Args:
        visual: the open_clip ``VisionTransformer`` (shared, not copied).
        stride: patch-embedding stride in pixels (1 <= stride <= patch size).
    """

    def __init__(self, visual: nn.Module, stride: int):
        super().__init__(visual, depth=0)
        if not 1 <= stride <= min(self.patch_size):
            raise ValueError(f"stride must be in [1, {min(self.patch_size)}], got {stride}")
        self.stride = int(stride)

    def grid_for(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) token grid of an (H, W) input at this stride."""
        (ph, pw), s = self.patch_size, self.stride
        return (image_size[0] - ph) // s + 1, (image_size[1] - pw) // s + 1

    def forward(self, images: torch.Tensor, masks=None) -> VisionOutput:
        """Encode normalised images (B, 3, H, W), H, W >= patch size; ``masks`` must be None.

        Returns:
            ``VisionOutput(embedding (B, D), tokens (B, h*w, d_v), grid (h, w))``.
        """
        if masks is not None:
            raise ValueError("StridedPatchEncoder has no mask prompts")
        conv = self.visual.conv1
        native = conv.stride
        conv.stride = (self.stride, self.stride)
        try:
            return super().forward(images)
        finally:
            conv.stride = native

    def extra_repr(self) -> str:
        return f"stride={self.stride}, native_grid={self.native_grid}"
