#!/usr/bin/env python
"""Convert a published OVSeg checkpoint (facebookresearch/ov-seg) into one of our TwoStageOVSeg
checkpoints, plus one ready-to-use config per given two-stage config.

Input (--input): OVSeg's detectron2 checkpoint, e.g. ovseg_swinbase_vitL14_ft_mpt.pth (Swin-B +
ViT-L/14), ovseg_R101c_vitB16_ft_mpt.pth (R101c + ViT-B/16) or ovseg_swinbase_vitL14_mpt_only.pt.
It is read with ``torch.load(weights_only=True)`` (``ov_seg.checkpoint.safe_torch_load``):
nothing in the file runs.

Outputs:
  --output X.pth   our merged checkpoint {"model": TwoStageOVSeg state dict, "meta": {...}}: the
                   MaskFormer proposal generator (backbone, pixel decoder, transformer decoder, the
                   class head's query projection and OVSeg's no-object embedding) and the adapted
                   CLIP with its mask prompts. Use it as MODEL.WEIGHTS.
  X_<config>.yaml  for each --config-file: ``_BASE_`` = that config, plus the overrides the weights
                   need: MODEL.WEIGHTS X.pth, PROPOSAL_WEIGHTS / CLIP.PRETRAINED "", QuickGELU
                   (OVSeg's CLIP is OpenAI's), the "vild" templates, the mask prompt depth and the
                   decoder sizes read from the weights, λ (the config's, or --ensemble-weight), and
                   what the released OVSeg config of this backbone sets at test time (MASK_THR;
                   R101c: FrozenBN, RES5_MULTI_GRID [1, 2, 4], test size 512 / 2048).

Every key of the input is accounted for: mapped onto our model, or dropped with a reason (logged);
an input key no rule knows, a key of our model the input does not fill, or a shape that differs
is an error naming the keys. The converted file is loaded strictly into the model built from the
first --config-file before it is written.

Published numbers to expect (mIoU, ADE-847 / PC-459 / ADE-150 / PC-59 / VOC-20): Swin-B + ViT-L/14
9.0 / 12.4 / 29.6 / 55.7 / 94.5; R101c + ViT-B/16 7.1 / 11.0 / 24.8 / 53.3 / 92.6.

    python tools/convert_ovseg_checkpoint.py --input ovseg_swinbase_vitL14_ft_mpt.pth \\
        --output weights/ovseg_swinB_vitL14.pth \\
        --config-file configs/two_stage/swinB_vitL14_ade150.yaml \\
        --config-file configs/two_stage/swinB_vitL14_pc59.yaml
    python tools/train_net.py --eval-only \\
        --config-file weights/ovseg_swinB_vitL14_swinB_vitL14_ade150.yaml
"""

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from detectron2.utils.logger import setup_logger

import ov_seg  # noqa: F401 (registration)
from ov_seg.checkpoint import SafeCheckpointer, safe_torch_load
from ov_seg.engine import Trainer
from ov_seg.engine.setup import get_ov_seg_cfg

P = "proposal_source.model."  # our ProposalMaskFormer inside TwoStageOVSeg
PROMPTS = "crop_classifier.encoder.prompts"

# Test-time settings of OVSeg's released configs (configs/ovseg_R101c_vitB_bs32_120k.yaml,
# configs/ovseg_swinB_vitL_bs32_120k.yaml) that the weights do not carry.
RELEASED = {
    "resnet": {
        "MODEL.RESNETS.NORM": "FrozenBN",  # the released R101c config leaves detectron2's FrozenBN
        "MODEL.RESNETS.RES5_MULTI_GRID": [1, 2, 4],
        "MODEL.CLIP.MASK_THR": 0.5,
        "INPUT.MIN_SIZE_TEST": 512,
        "INPUT.MAX_SIZE_TEST": 2048,
    },
    "swin": {"MODEL.CLIP.MASK_THR": 0.4, "INPUT.MIN_SIZE_TEST": 640, "INPUT.MAX_SIZE_TEST": 2560},
}

# keys dropped whatever the model: (pattern, reason)
DROPPED = [
    (r"^criterion\.empty_weight$", "training-loss class weights (no-object weight 0.1): unused"),
    (r"^pixel_(mean|std)$", "input normalisation: MODEL.PIXEL_MEAN / PIXEL_STD of the config"),
    (r"^clip_adapter\.pixel_(mean|std)$", "CLIP pixel statistics: constants in ov_seg"),
    (
        r"^clip_adapter\.clip_model\.(input_resolution|context_length|vocab_size)$",
        "TorchScript metadata of OpenAI's CLIP archive, not a weight",
    ),
    (r"\.relative_position_index$", "Swin buffer recomputed by timm"),
    (r"\.attn_mask$", "Swin shifted-window mask, recomputed"),
    (r"\.num_batches_tracked$", "BatchNorm step counter, not a weight (converted to FrozenBN)"),
]

DECODER = P + "transformer_decoder.layers."
# sem_seg_head.predictor.* (ov-seg's DETR TransformerPredictor) -> our DETRTransformerDecoder /
# open-vocabulary class head; (pattern, replacement)
PREDICTOR = [
    (r"^query_embed\.", P + "transformer_decoder.query_embed."),
    (r"^input_proj\.", P + "transformer_decoder.input_proj."),
    (r"^mask_embed\.layers\.", P + "transformer_decoder.mask_embed.layers."),
    (r"^class_embed\.layers\.", P + "class_head.projection.layers."),
    (r"^transformer\.decoder\.norm\.", P + "transformer_decoder.norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", DECODER + r"\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.", DECODER + r"\1.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", DECODER + r"\1.ffn.linear\2."),
]


@dataclass
class Conversion:
    """Result of ``convert_state_dict``."""

    state: Dict[str, torch.Tensor] = field(default_factory=dict)  # our key -> tensor
    mapped: Dict[str, str] = field(default_factory=dict)  # OVSeg key -> our key
    dropped: Dict[str, str] = field(default_factory=dict)  # OVSeg key -> reason
    backbone: str = ""  # "resnet" or "swin"
    overrides: Dict[str, Any] = field(default_factory=dict)  # config keys read from the weights


class ConversionError(ValueError):
    """Keys that no rule maps, keys of our model left unfilled, or shapes that differ."""


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(list(keys)[:limit]) + more


def extract_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The model weights of a loaded OVSeg checkpoint (``{"model": ...}`` as detectron2 saves it, or
    a bare state dict); other top-level entries (optimizer, scheduler, iteration) are ignored."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError("not an OVSeg checkpoint: expected {'model': state dict}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"non-tensor entries in the state dict: {_listing(bad)}")
    return state


def _swin_key(rest: str) -> Optional[str]:
    """ov-seg's Swin (the original Swin layout, D2SwinTransformer) -> our timm Swin wrapper."""
    if rest.startswith("patch_embed.") or re.match(r"^layers\.\d+\.blocks\.", rest):
        return "model." + rest
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", rest)
    if m:  # the original Swin merges patches at the end of a stage, timm at the start of the next
        return f"model.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    m = re.match(r"^norm(\d)\.(.*)$", rest)
    if m:  # the LayerNorm of each exposed stage output
        return f"norms.res{int(m.group(1)) + 2}.{m.group(2)}"
    return None


def _map_key(key: str, backbone: str, num_levels: int) -> Optional[str]:
    if key.startswith("backbone."):
        rest = key[len("backbone.") :]
        ours = _swin_key(rest) if backbone == "swin" else rest
        return None if ours is None else P + "backbone." + ours
    m = re.match(r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.(.*)$", key)
    if m:  # ov-seg numbers FPN levels 1 (finest) .. n (coarsest); ours index 0 = coarsest
        kind, level, rest = m.group(1), int(m.group(2)), m.group(3)
        convs = "lateral_convs" if kind == "adapter" else "output_convs"
        return f"{P}pixel_decoder.{convs}.{num_levels - level}.{rest}"
    if key.startswith("sem_seg_head.pixel_decoder.mask_features."):
        return P + key[len("sem_seg_head.") :]
    if key.startswith("sem_seg_head.predictor."):
        rest = key[len("sem_seg_head.predictor.") :]
        for pattern, repl in PREDICTOR:
            if re.match(pattern, rest):
                return re.sub(pattern, repl, rest)
        m = re.match(r"^transformer\.decoder\.layers\.(\d+)\.norm(\d)\.(.*)$", rest)
        if m:  # norm1 / norm2 / norm3 after self-attention / cross-attention / FFN
            i, n, tail = m.groups()
            return f"{P}transformer_decoder.layers.{i}.norms.{int(n) - 1}.{tail}"
        return None
    if key == "clip_adapter.non_object_embedding":
        return P + "class_head.text_classifier.void_embedding"
    if key.startswith("clip_adapter.clip_model."):  # OpenAI's CLIP and open_clip share key names
        return "crop_classifier.clip." + key[len("clip_adapter.clip_model.") :]
    return None


def convert_state_dict(src: Dict[str, torch.Tensor], mask_prompts: bool = True) -> Conversion:
    """Map an OVSeg state dict onto ``TwoStageOVSeg`` keys.

    Args:
        src: OVSeg's model state dict (``extract_state_dict``).
        mask_prompts: keep the mask prompts (``clip_adapter.clip_model.visual.mask_embedding``);
            False drops them (depth 0: the FT-only ablation of an FT+MPT checkpoint).

    Returns:
        the ``Conversion``: our state dict, the mapping, the dropped keys with reasons, the
        backbone kind and the config overrides read from the weights.

    Raises:
        ConversionError: keys no rule knows (named).
    """
    out = Conversion(backbone="swin" if "backbone.patch_embed.proj.weight" in src else "resnet")
    levels = {
        int(m.group(1))
        for k in src
        for m in [re.match(r"^sem_seg_head\.pixel_decoder\.layer_(\d+)\.", k)]
        if m
    }
    unknown = []
    for key, value in src.items():
        reason = next((r for pattern, r in DROPPED if re.search(pattern, key)), None)
        if key == "clip_adapter.clip_model.visual.mask_embedding":
            if value.shape[0] == 0:
                reason = "empty: the checkpoint has no mask prompts (depth 0)"
            elif not mask_prompts:
                reason = "--no-mask-prompts: evaluate without the mask prompts (depth 0)"
            else:
                out.state[PROMPTS] = _full_grid_prompts(value, src)
                out.mapped[key] = PROMPTS
                continue
        if reason is not None:
            out.dropped[key] = reason
            continue
        ours = _map_key(key, out.backbone, max(levels, default=0))
        if ours is None:
            unknown.append(key)
            continue
        out.state[ours] = value
        out.mapped[key] = ours
    if unknown:
        raise ConversionError(
            f"{len(unknown)} keys of the OVSeg checkpoint have no mapping: "
            f"{_listing(sorted(unknown))}"
        )
    out.overrides = _read_overrides(src, out)
    return out


def _full_grid_prompts(value: torch.Tensor, src: Dict[str, torch.Tensor]) -> torch.Tensor:
    """OVSeg's mask embedding (depth, grid² or 1, width); one shared token per depth is repeated
    over the grid (as OVSeg's forward does)."""
    if value.shape[1] != 1:
        return value
    grid2 = src["clip_adapter.clip_model.visual.positional_embedding"].shape[0] - 1
    return value.expand(-1, grid2, -1).contiguous()


def _read_overrides(src: Dict[str, torch.Tensor], conv: Conversion) -> Dict[str, Any]:
    """Config keys whose values the weights fix."""
    pred = "sem_seg_head.predictor."
    query = src[pred + "query_embed.weight"]
    decoder_layer = re.compile(rf"^{re.escape(pred)}transformer\.decoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in src for m in [decoder_layer.match(k)] if m}
    head = sorted(
        k for k in src if re.match(rf"^{re.escape(pred)}class_embed\.layers\.\d+\.weight$", k)
    )
    if len(head) != 2:
        raise ConversionError(
            f"OVSeg's class_embed has {len(head)} layers; the open_vocab head has 2 "
            "(EMBED_LAYERS 2)"
        )
    mask_features = src["sem_seg_head.pixel_decoder.mask_features.weight"]
    prompts = conv.state.get(PROMPTS)
    out = {
        "MODEL.MASK_FORMER.CLASS_HEAD.NAME": "open_vocab",
        "MODEL.MASK_FORMER.CLASS_HEAD.EMBED_HIDDEN_DIM": int(src[head[0]].shape[0]),
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": int(query.shape[0]),
        "MODEL.MASK_FORMER.HIDDEN_DIM": int(query.shape[1]),
        "MODEL.MASK_FORMER.DEC_LAYERS": len(layers),
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD": int(
            src[pred + "transformer.decoder.layers.0.linear1.weight"].shape[0]
        ),
        "MODEL.PIXEL_DECODER.CONVS_DIM": int(mask_features.shape[1]),
        "MODEL.PIXEL_DECODER.MASK_DIM": int(mask_features.shape[0]),
        # MaskFormer's masks at stride 4: no image-guided mask features in OVSeg's model
        "MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE": 0,
        "MODEL.CLIP.ACTIVATION": "quick_gelu",  # OVSeg's CLIP is OpenAI's, always QuickGELU
        "MODEL.CLIP.TEMPLATES": "vild",  # both released configs: TEXT_TEMPLATES "vild" (14)
        "MODEL.CLIP.MASK_PROMPT_DEPTH": 0 if prompts is None else int(prompts.shape[0]),
    }
    return {**out, **RELEASED[conv.backbone]}


def _opts(overrides: Dict[str, Any]) -> List[str]:
    return [x for k, v in overrides.items() for x in (k, repr(v) if not isinstance(v, str) else v)]


def build_model(config_file: str, overrides: Dict[str, Any], extra_opts: Sequence[str] = ()):
    """TwoStageOVSeg of ``config_file`` with ``overrides`` (weights as given there)."""
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(_opts(overrides) + list(extra_opts))
    cfg.freeze()
    if cfg.MODEL.META_ARCHITECTURE != "TwoStageOVSeg":
        raise SystemExit(f"{config_file} is not a TwoStageOVSeg config")
    return cfg, Trainer.build_model(cfg)


def check_against_model(conv: Conversion, model: torch.nn.Module) -> None:
    """Every key of ``model`` filled, nothing else, same shapes.

    Raises:
        ConversionError: naming the missing / unexpected keys and the shape mismatches.
    """
    own = model.state_dict()
    source_of = {ours: src for src, ours in conv.mapped.items()}
    missing = sorted(set(own) - set(conv.state))
    unexpected = sorted(f"{k} (from {source_of[k]})" for k in set(conv.state) - set(own))
    shapes = sorted(
        f"{k}: {tuple(v.shape)} from {source_of[k]} vs model {tuple(own[k].shape)}"
        for k, v in conv.state.items()
        if k in own and v.shape != own[k].shape
    )
    problems = [
        f"{len(keys)} {what}: {_listing(keys, limit)}"
        for keys, what, limit in (
            (missing, "keys of our model not in the checkpoint", 20),
            (unexpected, "mapped keys not in our model", 20),
            (shapes, "shapes differ", 10),
        )
        if keys
    ]
    if problems:
        raise ConversionError(
            "the converted weights do not fit the config's model: " + "; ".join(problems)
        )


def _nested(overrides: Dict[str, Any]) -> Dict[str, Any]:
    root: Dict[str, Any] = {}
    for key, value in overrides.items():
        node = root
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return root


def write_config(path: Path, base_config: str, overrides: Dict[str, Any]) -> None:
    """``_BASE_`` (relative to ``path``) + the overrides, as YAML."""
    base = os.path.relpath(os.path.abspath(base_config), os.path.abspath(path.parent))
    text = "# an OVSeg checkpoint converted by tools/convert_ovseg_checkpoint.py\n"
    text += yaml.safe_dump({"_BASE_": base, **_nested(overrides)}, sort_keys=False)
    path.write_text(text)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="OVSeg checkpoint (.pth / .pt)")
    p.add_argument(
        "--config-file",
        action="append",
        required=True,
        help="a TwoStageOVSeg config of this backbone (configs/two_stage/...); repeat the option "
        "for several: one YAML each",
    )
    p.add_argument("--output", required=True, help="our converted checkpoint (.pth)")
    p.add_argument("--no-mask-prompts", action="store_true", help="drop the mask prompts (depth 0)")
    p.add_argument(
        "--ensemble-weight",
        type=float,
        help="λ written into every YAML (default: each config's own, OVSeg's per-dataset value)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (build)")
    return p


def main(argv=None) -> Tuple[Path, List[Path]]:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="ov_seg")
    conv = convert_state_dict(
        extract_state_dict(safe_torch_load(args.input)), not args.no_mask_prompts
    )
    for key, reason in sorted(conv.dropped.items()):
        logger.info("dropped %s: %s", key, reason)
    logger.info(
        "%s backbone; %d keys mapped, %d dropped; overrides %s",
        conv.backbone,
        len(conv.mapped),
        len(conv.dropped),
        conv.overrides,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    meta = {
        "converted_from": os.path.basename(args.input),
        "clip_activation": "quick_gelu",
        "mask_prompt_depth": conv.overrides["MODEL.CLIP.MASK_PROMPT_DEPTH"],
        "dropped": dict(conv.dropped),
    }
    torch.save({"model": conv.state, "meta": meta}, tmp)
    try:
        # the model of the first config, built with the overrides and this file as MODEL.WEIGHTS
        # (which sizes its mask prompts), must take the weights strictly
        weights = {
            **conv.overrides,
            "MODEL.WEIGHTS": str(tmp),
            "MODEL.TWO_STAGE.PROPOSAL_WEIGHTS": "",
            "MODEL.CLIP.PRETRAINED": "",
        }
        _, model = build_model(args.config_file[0], weights, args.opts)
        check_against_model(conv, model)
        SafeCheckpointer(model).load(str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    configs = []
    for config_file in args.config_file:
        cfg = get_ov_seg_cfg()
        cfg.merge_from_file(config_file)
        lam = (
            cfg.MODEL.TWO_STAGE.ENSEMBLE_WEIGHT
            if args.ensemble_weight is None
            else args.ensemble_weight
        )
        overrides = {
            **conv.overrides,
            "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT": float(lam),
            "MODEL.WEIGHTS": os.path.abspath(out),
            "MODEL.TWO_STAGE.PROPOSAL_WEIGHTS": "",
            "MODEL.CLIP.PRETRAINED": "",
        }
        path = out.with_name(f"{out.stem}_{Path(config_file).stem}.yaml")
        write_config(path, config_file, overrides)
        configs.append(path)
        logger.info("config written to %s", path)
    logger.info("converted checkpoint written to %s", out)
    return out, configs


if __name__ == "__main__":
    main()
