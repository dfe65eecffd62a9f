"""GroupViT-style grouping on an open_clip ViT trunk, with the hooks MixReorg's branches need.

``GroupingBlock`` merges N tokens into G segment tokens: learned group tokens (after a token-mixing
MLP and a cross-attention to the tokens) assign every token to one group with a Gumbel-softmax over
the groups, hard (one-hot, straight-through) in training, and each group averages the values of its
tokens.

``GroupingViT`` lays the blocks of an open_clip ``VisionTransformer`` out as GroupViT does
(group tokens join the sequence at the start of a stage, a grouping block ends it):

    patch embed → context blocks [0, L_c) → stage 1 blocks [L_c, D_1) with G_1 group tokens (the
    "progressive" layers, each followed by a cross-attention) → grouping 1 → stage 2 blocks with G_2
    group tokens → grouping 2 → ... → final blocks on the G_S segment tokens → ln_post → projection
    to D.

The encoder itself knows nothing about mixing: ``progressive`` takes the key/value tokens of every
query sequence explicitly, so the caller decides what a sequence attends to (itself for the original
images, its source images for mixed ones).
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ov_seg.modeling.clip import interpolate_grid_embedding

__all__ = [
    "GroupingBlock",
    "GroupingStage",
    "GroupingViT",
    "ProgressiveCrossAttention",
    "gumbel_assignment",
    "token_to_segment",
]


def gumbel_assignment(
    logits: torch.Tensor, *, dim: int, hard: bool, gumbel: bool, tau: float = 1.0
) -> torch.Tensor:
    """Softmax over ``dim`` with optional Gumbel noise and straight-through one-hot.

    Args:
        logits: assignment logits, e.g. (B, G, N) with the groups on ``dim``.
        dim: the dimension to normalise over (the groups).
        hard: one-hot argmax in the forward pass, softmax gradient in the backward pass.
        gumbel: add Gumbel(0, 1) noise before the softmax (training).
        tau: softmax temperature.

    Returns:
        a tensor like ``logits`` that sums to 1 over ``dim``.
    """
    if gumbel:
        noise = -torch.empty_like(logits).exponential_().log()
        logits = logits + noise
    soft = (logits / tau).softmax(dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


class _MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class ProgressiveCrossAttention(nn.Module):
    """Pre-norm residual cross-attention ``q + Attn(LN(q), LN(kv))`` whose output projection starts
    at zero, so that adding it to a pretrained trunk changes nothing at initialisation."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """
        Args:
            q: (B, Nq, d) queries.
            kv: (B, Nk, d) keys / values (the same batch order as ``q``).

        Returns:
            (B, Nq, d) updated queries.
        """
        kv = self.norm_kv(kv)
        return q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]


class GroupingBlock(nn.Module):
    """Merge N tokens into G segment tokens (GroupViT's grouping block, written from its
    description).

    1. Group tokens (B, G_in, d) → LayerNorm → token-mixing MLP (G_in → G) → cross-attention to the
       tokens + MLP: the G "assigners" g.
    2. Assignment logits ``q(g)·k(x)^T / sqrt(d)`` (B, G, N); softmax over the groups, with Gumbel
       noise in training, one-hot (straight-through) when ``hard``, in training and at test.
    3. Each group averages the values of its tokens (``A / (Σ_tokens A + 1)``, so an empty group
       gets zero), projects them and adds them to g; a residual MLP follows.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_group_tokens: int,
        num_output_groups: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        hard: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        cosine_temperature: float = 0.0,
        aligned_init: bool = False,
    ):
        """
        Args:
            dim: token width d.
            num_group_tokens: G_in, group tokens that ran through the stage.
            num_output_groups: G, segments produced.
            num_heads: heads of the pre-assignment cross-attention.
            mlp_ratio: hidden width of the channel MLPs, as a multiple of d (the token-mixing MLP's
                hidden width is max(G, G_in / 2)).
            hard: one-hot assignment (straight-through) in training.
            gumbel: Gumbel noise on the assignment logits in training.
            gumbel_tau: Gumbel-softmax temperature.
            cosine_temperature: > 0: assignment logits are cos(q, k) / this temperature; 0: the
                scaled dot product q·k / sqrt(d) (GroupViT).
            aligned_init: start as an average of the assigned tokens (``init_aligned``), so a
                pre-trained trunk's image-text alignment survives the new block; False: random.
        """
        super().__init__()
        self.hard, self.gumbel, self.gumbel_tau = hard, gumbel, gumbel_tau
        self.scale = dim**-0.5
        self.cosine_temperature = cosine_temperature
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        mix_hidden = max(num_output_groups, num_group_tokens // 2)
        self.token_mixer = _MLP(num_group_tokens, mix_hidden, num_output_groups)
        self.norm_pre = nn.LayerNorm(dim)
        self.pre_assign_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_pre_mlp = nn.LayerNorm(dim)
        self.pre_assign_mlp = _MLP(dim, int(dim * mlp_ratio), dim)
        self.norm_assign = nn.LayerNorm(dim)
        self.assign_q = nn.Linear(dim, dim)
        self.assign_k = nn.Linear(dim, dim)
        self.assign_v = nn.Linear(dim, dim)
        self.assign_proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.out_mlp = _MLP(dim, int(dim * mlp_ratio), dim)
        if aligned_init:
            self.init_aligned()

    # scale of the group-token path in an aligned start (small: the segments carry the tokens'
    # content; the assignment reads the group tokens through a LayerNorm, so it is unaffected)
    ALIGNED_GROUP_SCALE = 0.05

    @torch.no_grad()
    def init_aligned(self) -> None:
        """Initialise so that each output segment is (nearly) the mean of the tokens assigned to
        it: value and output projections the identity, the residual branches that write into the
        group tokens (pre-assignment attention and MLP, output MLP) zero, the token-mixing path
        scaled by ``ALIGNED_GROUP_SCALE``. The assignment itself keeps its random start. Project
        design (not GroupViT's): without it the block's random output hides the pre-trained
        tower's alignment and the model must relearn it."""
        for lin in (self.assign_v, self.assign_proj):
            lin.weight.copy_(torch.eye(lin.weight.shape[0]))
            lin.bias.zero_()
        for out in (self.pre_assign_attn.out_proj, self.pre_assign_mlp[-1], self.out_mlp[-1]):
            out.weight.zero_()
            out.bias.zero_()
        self.token_mixer[-1].weight.mul_(self.ALIGNED_GROUP_SCALE)
        self.token_mixer[-1].bias.mul_(self.ALIGNED_GROUP_SCALE)

    def forward(
        self, x: torch.Tensor, group_tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, N, d) tokens.
            group_tokens: (B, G_in, d) group tokens after the stage.

        Returns:
            segments: (B, G, d) the new tokens.
            soft: (B, N, G) soft assignment of each token over the groups, without noise (rows sum
                to 1); used for the segmentation loss and at inference.
        """
        x = self.norm_x(x)
        g = self.token_mixer(self.norm_tokens(group_tokens).transpose(1, 2)).transpose(1, 2)
        q = self.norm_pre(g)
        g = g + self.pre_assign_attn(q, x, x, need_weights=False)[0]
        g = g + self.pre_assign_mlp(self.norm_pre_mlp(g))
        gn = self.norm_assign(g)
        q, k = self.assign_q(gn), self.assign_k(x)
        if self.cosine_temperature > 0:
            # centred over the groups / the tokens: the logits follow how a token differs from the
            # image's other tokens, not what all of them share
            q = F.normalize(q - q.mean(dim=1, keepdim=True), dim=-1)
            k = F.normalize(k - k.mean(dim=1, keepdim=True), dim=-1)
            logits = torch.einsum("bgd,bnd->bgn", q, k) / self.cosine_temperature
        else:
            logits = torch.einsum("bgd,bnd->bgn", q, k) * self.scale
        soft = logits.softmax(dim=1)
        # Gumbel noise in training only; hard (one-hot) assignment in training and at test alike
        assign = gumbel_assignment(
            logits,
            dim=1,
            hard=self.hard,
            gumbel=self.gumbel and self.training,
            tau=self.gumbel_tau if self.training else 1.0,
        )
        weights = assign / (assign.sum(dim=-1, keepdim=True) + 1.0)
        g = g + self.assign_proj(torch.einsum("bgn,bnd->bgd", weights, self.assign_v(x)))
        g = g + self.out_mlp(self.norm_out(g))
        return g, soft.transpose(1, 2)


class GroupingStage(nn.Module):
    """Learned group tokens, the transformer blocks they run through and the grouping block that
    ends the stage. The blocks are open_clip ``ResidualAttentionBlock`` s (batch-first)."""

    def __init__(
        self, *, blocks: Sequence[nn.Module], grouping: GroupingBlock, num_tokens: int, dim
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grouping = grouping
        self.group_tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)

    def prepend_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) → (B, G + N, d) with the group tokens first."""
        return torch.cat([self.group_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    @property
    def num_tokens(self) -> int:
        return int(self.group_tokens.shape[0])


class GroupingViT(nn.Module):
    """GroupViT-style image encoder built from an open_clip ``VisionTransformer`` (see module doc).

    The class token is dropped; the patch positional embeddings are resized to the input's grid, so
    any input size that is a multiple of the patch size works. Blocks beyond the layout are
    discarded; the open_clip tower's ``ln_post`` is the final norm; the projection to the joint
    space is CLIP's linear ``proj`` (``proj_hidden`` = 0) or a new 2-layer MLP (GroupViT).
    """

    def __init__(
        self,
        *,
        visual: nn.Module,
        embed_dim: int,
        context_depth: int,
        depths: Sequence[int],
        num_group_tokens: Sequence[int],
        progressive: bool = True,
        proj_hidden: int = 0,
        hard: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_cosine_temperature: float = 0.0,
        aligned_init: bool = False,
        freeze_at: int = 0,
    ):
        """
        Args:
            visual: an open_clip ``VisionTransformer`` (its modules are taken over).
            embed_dim: D, the joint embedding width.
            context_depth: L_c, blocks before the group tokens join (and before mixing).
            depths: blocks per stage: ``len(num_group_tokens) + 1`` entries, the first one including
                the ``context_depth`` context blocks, the last one running on the final segments.
            num_group_tokens: group tokens (= output segments) per grouping stage, e.g. [64, 8].
            progressive: a ``ProgressiveCrossAttention`` after each block of the first stage.
            proj_hidden: hidden width of the 2-layer projection MLP; 0 = CLIP's linear projection.
            hard, gumbel, gumbel_tau: grouping assignment options (see ``GroupingBlock``).
            assign_cosine_temperature: ``GroupingBlock``'s ``cosine_temperature``.
            aligned_init: ``GroupingBlock``'s ``aligned_init`` for every grouping block.
            freeze_at: freeze the patch embedding and the first ``freeze_at`` trunk blocks (0 =
                none).

        Raises:
            ValueError: the layout does not fit the tower.
        """
        super().__init__()
        depths, num_group_tokens = [int(d) for d in depths], [int(g) for g in num_group_tokens]
        blocks = list(visual.transformer.resblocks)
        if len(depths) != len(num_group_tokens) + 1:
            raise ValueError(
                f"DEPTHS needs one entry per grouping stage plus the final stage: {depths} for "
                f"{len(num_group_tokens)} grouping stages"
            )
        if not num_group_tokens or min(num_group_tokens) < 1 or min(depths) < 0:
            raise ValueError(
                f"bad grouping layout: depths {depths}, group tokens {num_group_tokens}"
            )
        if not 0 <= context_depth <= depths[0]:
            raise ValueError(
                f"CONTEXT_DEPTH {context_depth} must lie in [0, DEPTHS[0]={depths[0]}]"
            )
        if sum(depths) > len(blocks):
            raise ValueError(
                f"DEPTHS {depths} need {sum(depths)} blocks; the tower has {len(blocks)}"
            )
        self.width = int(visual.conv1.out_channels)
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.grid = tuple(int(g) for g in visual.grid_size)
        heads = blocks[0].attn.num_heads if blocks else max(1, self.width // 64)

        self.conv1 = visual.conv1
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.context_blocks = nn.ModuleList(blocks[:context_depth])
        start = context_depth
        stages = []
        for s, (depth, groups) in enumerate(zip(depths[:-1], num_group_tokens)):
            depth = depth - context_depth if s == 0 else depth
            grouping = GroupingBlock(
                dim=self.width,
                num_group_tokens=groups,
                num_output_groups=groups,
                num_heads=heads,
                hard=hard,
                gumbel=gumbel,
                gumbel_tau=gumbel_tau,
                cosine_temperature=assign_cosine_temperature,
                aligned_init=aligned_init,
            )
            stages.append(
                GroupingStage(
                    blocks=blocks[start : start + depth],
                    grouping=grouping,
                    num_tokens=groups,
                    dim=self.width,
                )
            )
            start += depth
        self.stages = nn.ModuleList(stages)
        self.final_blocks = nn.ModuleList(blocks[start : start + depths[-1]])
        self.cross_attn = nn.ModuleList(
            [ProgressiveCrossAttention(self.width, heads) for _ in self.stages[0].blocks]
            if progressive
            else []
        )
        self.ln_post = visual.ln_post
        if proj_hidden > 0:
            self.proj = _MLP(self.width, proj_hidden, embed_dim)
        else:
            proj = getattr(visual, "proj", None)
            if not isinstance(proj, torch.Tensor) or tuple(proj.shape) != (self.width, embed_dim):
                raise ValueError("PROJ_HIDDEN 0 needs the tower's linear projection (d_v, D)")
            self.proj = nn.Linear(self.width, embed_dim, bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(proj.detach().t())
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        if freeze_at <= 0:
            return
        frozen: List[nn.Module] = [self.conv1, self.ln_pre]
        self.positional_embedding.requires_grad_(False)
        trunk = list(self.context_blocks) + list(self.stages[0].blocks)
        frozen += trunk[:freeze_at]
        for m in frozen:
            m.requires_grad_(False)

    @property
    def num_segments(self) -> int:
        return self.stages[-1].num_tokens

    @property
    def has_progressive(self) -> bool:
        return len(self.cross_attn) > 0

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch tokens (B, N, d) and their grid (h, w) for normalised images (B, 3, H, W)."""
        x = self.conv1(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        pos = interpolate_grid_embedding(self.positional_embedding[1:], self.grid, grid)
        return self.ln_pre(x + pos.to(x.dtype)), grid

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Run the context blocks on patch tokens (B, N, d)."""
        for blk in self.context_blocks:
            x = blk(x)
        return x

    def start_progressive(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) patch tokens → (B, G_1 + N, d) with the first stage's group tokens."""
        return self.stages[0].prepend_tokens(x)

    def progressive_block(self, i: int, seq: torch.Tensor) -> torch.Tensor:
        """Self-attention block ``i`` of the first stage on (B, G_1 + N, d)."""
        return self.stages[0].blocks[i](seq)

    def progressive_cross(self, i: int, patches: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Cross-attention ``i`` of the first stage (identity when progressive mixing is off).

        Args:
            patches: (B, N, d) patch tokens (queries).
            kv: (B, N', d) the tokens each query sequence may attend to.
        """
        if not self.has_progressive:
            return patches
        return self.cross_attn[i](patches, kv)

    @property
    def num_progressive_blocks(self) -> int:
        return len(self.stages[0].blocks)

    def progressive(self, seq: torch.Tensor) -> torch.Tensor:
        """The first stage's blocks on the original images, each cross-attention pointed at
        itself."""
        g = self.stages[0].num_tokens
        for i in range(self.num_progressive_blocks):
            seq = self.progressive_block(i, seq)
            patches = self.progressive_cross(i, seq[:, g:], seq[:, g:])
            seq = torch.cat([seq[:, :g], patches], dim=1)
        return seq

    def neck(self, seq: torch.Tensor) -> Dict[str, object]:
        """Grouping stages from the end of the first stage's blocks to the final segment tokens.

        Args:
            seq: (B, G_1 + N, d) output of the first stage's blocks (group tokens first).

        Returns:
            dict with ``segments`` (B, G_S, d) after ``ln_post`` and ``assignments``: the soft
            assignment of each stage, [(B, N, G_1), (B, G_1, G_2), ...].
        """
        assignments = []
        for s, stage in enumerate(self.stages):
            if s > 0:
                seq = stage.prepend_tokens(seq)
                for blk in stage.blocks:
                    seq = blk(seq)
            g = stage.num_tokens
            seq, soft = stage.grouping(seq[:, g:], seq[:, :g])
            assignments.append(soft)
        for blk in self.final_blocks:
            seq = blk(seq)
        return {"segments": self.ln_post(seq), "assignments": assignments}

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map (..., d) tokens into the joint space (..., D) (not normalised)."""
        return self.proj(tokens)

    def forward(self, images: torch.Tensor) -> Dict[str, object]:
        """The original-image branch (inference).

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of the patch size.

        Returns:
            dict of ``neck`` plus ``grid`` (h, w).
        """
        x, grid = self.embed(images)
        seq = self.progressive(self.start_progressive(self.context(x)))
        out = self.neck(seq)
        out["grid"] = grid
        return out


def token_to_segment(assignments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chain per-stage soft assignments into the token-to-final-segment map A = A_1·A_2·... (B, N,
    G_S)."""
    out = assignments[0]
    for a in assignments[1:]:
        out = torch.bmm(out, a)
    return out
