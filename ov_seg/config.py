"""Config nodes of ov_seg.

One ``add_*_config`` function per config node, every key commented. ``add_ov_seg_config`` applies
all of them; later modules add their node here and append the adder to ``_ADDERS``.
"""

import warnings

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_ov_seg_config", "OVSegCfgNode", "DEPRECATED_KEYS", "upgrade_deprecated_keys"]


def add_solver_config(cfg):
    """Optimizer / schedule keys beyond detectron2's (MaskFormer-style)."""
    # Optimizer type: one of "SGD", "ADAMW" (dispatched in Trainer.build_optimizer).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # LR multiplier for parameters whose name starts with "backbone." (R101c in OVSeg: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # LR multiplier for parameters of CLIP towers that are trained (fine-tuning a pretrained CLIP).
    cfg.SOLVER.CLIP_MULTIPLIER = 1.0
    # Weight decay for embedding parameters (positional / query / prompt embeddings, logit scales).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # AdamW betas (beta1, beta2); CLIP training uses (0.9, 0.98).
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # AdamW epsilon.
    cfg.SOLVER.EPS = 1e-8
    # Gradient clipping: detectron2's SOLVER.CLIP_GRADIENTS, plus CLIP_TYPE "full_model" which clips
    # the global norm over all parameters together (MaskFormer / OVSeg use full_model with
    # CLIP_VALUE 0.01).
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"


def add_input_config(cfg):
    """Data-loading keys."""
    # Dataset mapper used by the train / test loaders, by name (see ov_seg.data.dataset_mappers):
    # "semantic", "panoptic", "caption", "mask_category", or "detectron2" for detectron2's
    # DatasetMapper.
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Mapper used at test time ("" = same as DATASET_MAPPER_NAME).
    cfg.INPUT.TEST_DATASET_MAPPER_NAME = ""
    # Pad images to a multiple of this size in the batch (-1 = the backbone's size_divisibility).
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Photometric augmentation (brightness / contrast / saturation jitter) in training mappers.
    cfg.INPUT.COLOR_AUG_SSD = False


def add_runtime_config(cfg):
    """Process-level keys."""
    cfg.RUNTIME = CN()
    # torch intra-op threads per process; 0 = the CPU cores free for this process (the affinity
    # mask, capped by OMP_NUM_THREADS when set, / processes).
    cfg.RUNTIME.NUM_THREADS = 0
    # Iterations between metric writes (console, metrics.json) in training.
    cfg.RUNTIME.LOG_PERIOD = 20


def add_weights_config(cfg):
    """How ``MODEL.WEIGHTS`` is loaded."""
    # Let a training run start from weights that fit the model only in part (an ImageNet
    # backbone, another head): the matching keys load, the others keep their initialisation and
    # are logged. False (default): any missing, unexpected or reshaped key is an error naming the
    # file and the keys. Evaluation, the demo, the tools and --resume always load strictly.
    cfg.MODEL.WEIGHTS_PARTIAL = False


def add_swin_config(cfg):
    """Swin backbone taken from timm (``D2SwinTransformer``, BACKBONE.NAME
    "build_swin_backbone")."""
    cfg.MODEL.SWIN = CN()
    # timm model name; its architecture (patch 4, window 12, embed 128, depths 2-2-18-2) is the
    # default unless overridden by the keys below (Swin-B window 12 at 384, as in OVSeg).
    cfg.MODEL.SWIN.TIMM_NAME = "swin_base_patch4_window12_384"
    # Image size the model (relative position tables, pretrained weights) was built for.
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 384
    # Overrides of the timm architecture (0 / empty = keep timm's value): patch embedding dim C,
    # blocks per stage, attention heads per stage, window size M.
    cfg.MODEL.SWIN.EMBED_DIM = 0
    cfg.MODEL.SWIN.DEPTHS = []
    cfg.MODEL.SWIN.NUM_HEADS = []
    cfg.MODEL.SWIN.WINDOW_SIZE = 0
    # Stochastic depth rate (Swin-B in MaskFormer: 0.3).
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Stage outputs exposed to the pixel decoder (strides 4, 8, 16, 32).
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Optional local timm checkpoint (ImageNet weights) loaded into the Swin at build time
    # (torch.load weights_only; "" = random init; MODEL.WEIGHTS still loads a full model
    # afterwards).
    cfg.MODEL.SWIN.PRETRAINED_FILE = ""


def add_pixel_decoder_config(cfg):
    """Pixel decoder of the MaskFormer proposal generator (per-pixel embeddings
    ``mask_features``)."""
    cfg.MODEL.PIXEL_DECODER = CN()
    # Registry name (ov_seg.modeling.pixel_decoder): "BasePixelDecoder" (FPN) or
    # "TransformerEncoderPixelDecoder" (FPN whose coarsest level goes through a transformer
    # encoder).
    cfg.MODEL.PIXEL_DECODER.NAME = "BasePixelDecoder"
    # Backbone features used, any order (sorted by stride internally).
    cfg.MODEL.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # FPN channels.
    cfg.MODEL.PIXEL_DECODER.CONVS_DIM = 256
    # Channels C_E of the per-pixel embeddings (stride 4) that the mask embeddings are dotted with.
    cfg.MODEL.PIXEL_DECODER.MASK_DIM = 256
    # Normalisation of the FPN convolutions ("GN", "BN", "SyncBN", "" = none).
    cfg.MODEL.PIXEL_DECODER.NORM = "GN"
    # Transformer encoder layers on the coarsest feature (TransformerEncoderPixelDecoder only; it
    # uses MASK_FORMER.NHEADS / DIM_FEEDFORWARD / DROPOUT / PRE_NORM).
    cfg.MODEL.PIXEL_DECODER.TRANSFORMER_ENC_LAYERS = 6
    # Mask features at a finer stride than 4 (0 = off, MaskFormer; 1 or 2 of the padded input): the
    # stride-4 embeddings upsampled plus a shallow conv branch on the image
    # (ImageGuidedMaskFeatures), so mask outlines can follow the image's edges.
    cfg.MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE = 0
    # Width of that image branch.
    cfg.MODEL.PIXEL_DECODER.IMAGE_SKIP_CHANNELS = 32


def add_maskformer_config(cfg):
    """MaskFormer proposal generator (``ProposalMaskFormer``): decoder, class head, matching,
    losses, inference."""
    cfg.MODEL.MASK_FORMER = CN()
    # Transformer decoder, by registry name (ov_seg.modeling.transformer_decoder).
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "DETRTransformerDecoder"
    # Memory the decoder attends to: a backbone feature name (MaskFormer with the FPN pixel decoder:
    # "res5") or "transformer_encoder" (output of the TransformerEncoderPixelDecoder's encoder).
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    # Number of learned queries N (= proposals per image).
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # Decoder width d, attention heads, FFN width, layers, dropout; post-norm as in DETR (PRE_NORM
    # False).
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # Always project the memory with a 1x1 conv (otherwise only when its channels differ from
    # HIDDEN_DIM).
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Deep supervision: losses on the outputs of every decoder layer (auxiliary losses).
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # Loss / matching-cost weights: classification (lambda_cls), sigmoid focal on masks
    # (lambda_focal), dice (lambda_dice); weight of the "no object" class in the cross-entropy.
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    # Sigmoid focal loss alpha and gamma.
    cfg.MODEL.MASK_FORMER.FOCAL_ALPHA = 0.25
    cfg.MODEL.MASK_FORMER.FOCAL_GAMMA = 2.0
    # Point-sampled mask losses (memory-bounded, PointRend-style): points per mask for matching and
    # losses; 0 = dense losses on all pixels (predictions upsampled to the padded image size).
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 0
    # Importance sampling of the loss points: candidates = OVERSAMPLE_RATIO x points, of which
    # IMPORTANCE_SAMPLE_RATIO are the most uncertain and the rest uniform.
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Dense mask losses at the target (padded image) size with upsampled predictions (MaskFormer),
    # or at the prediction size (stride 4) with area-resized, soft targets (False: 16x fewer
    # pixels).
    cfg.MODEL.MASK_FORMER.MASK_LOSS_AT_TARGET_SIZE = True
    # Run the convolutions of the backbone, pixel decoder and image branch in the channels-last
    # memory format (oneDNN's fast path on CPUs; same model and checkpoints, float rounding aside).
    cfg.MODEL.MASK_FORMER.CHANNELS_LAST = False

    cfg.MODEL.MASK_FORMER.CLASS_HEAD = CN()
    # Class head by registry name (ov_seg.modeling.heads): "open_vocab" (OVSeg: logits = tau
    # * cos(query embedding, text embedding of each class name) + a learned no-object embedding) or
    # "class_agnostic" (one "object" class + no-object).
    cfg.MODEL.MASK_FORMER.CLASS_HEAD.NAME = "open_vocab"
    # Hidden width of the MLP from the query to the text-embedding space (OVSeg: 256 -> 1024 -> D).
    cfg.MODEL.MASK_FORMER.CLASS_HEAD.EMBED_HIDDEN_DIM = 1024
    # Fixed temperature tau of the cosine logits (OVSeg: 100).
    cfg.MODEL.MASK_FORMER.CLASS_HEAD.LOGIT_SCALE = 100.0

    cfg.MODEL.MASK_FORMER.TEST = CN()
    # Outputs of inference: "sem_seg" (sum_q p_q(c) sigmoid(m_q)), "panoptic_seg" (MaskFormer
    # rules), "proposals" (masks + scores for the second stage, caption mining and proposal recall).
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PROPOSALS_ON = False
    # Panoptic: keep queries whose score exceeds this ...
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    # ... and drop a query whose visible area / its own (sigmoid >= 0.5) area is below this.
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    # Proposal score: "class" (1 - p(no object)) or "class_x_mask" (times the mean sigmoid of the
    # mask inside its binarised region, Mask2Former's instance score).
    cfg.MODEL.MASK_FORMER.TEST.PROPOSAL_SCORE = "class"


def add_panoptic_input_config(cfg):
    """The "panoptic" dataset mapper (per-segment masks + classes for mask-classification
    models)."""
    cfg.INPUT.PANOPTIC = CN()
    # Training vocabulary: "all" (the dataset's stuff_classes) or "seen" (its seen_classes metadata
    # only: labels re-indexed, other segments dropped), so an open-vocabulary class head never meets
    # unseen names.
    cfg.INPUT.PANOPTIC.TRAIN_VOCABULARY = "all"


def add_evaluation_config(cfg):
    """Evaluation keys beyond detectron2's."""
    # Evaluator type for every test dataset, overriding the dataset's ``evaluator_type`` metadata
    # ("" = use the metadata), e.g. "proposal_recall" to score the proposals of a panoptic dataset.
    cfg.TEST.EVALUATOR_TYPE = ""
    # An image (or ground-truth file) that cannot be read stops the evaluation (True) instead of
    # being skipped with a warning naming it and counted at the end (False).
    cfg.TEST.FAIL_ON_UNREADABLE_IMAGE = False
    # Memory budget (MiB) for one image's full-resolution outputs: the (K, H, W) class scores (and
    # the two-stage panoptic masks) are returned dense only when they fit; else ``sem_seg`` is the
    # (H, W) int64 label map (the same argmax), made from the model-resolution scores a chunk of
    # names at a time (``ov_seg.modeling.postprocess``). 0 = unbounded (always dense).
    cfg.TEST.MEMORY_BUDGET_MB = 512
    # Loader worker processes of the test loader (image decoding and mapping overlapped with the
    # model): -2 = DATALOADER.NUM_WORKERS (as training); -1 = the free cores minus the compute
    # threads (ov_seg.utils.threads.test_loader_workers; 0 when the model's threads take them all);
    # >= 0 = that many.
    cfg.TEST.NUM_WORKERS = -2


def add_seen_calibration_config(cfg):
    """Calibrated stacking of seen-class logits at test time (ov_seg.modeling.calibration), for the
    single-stage models (PACL, MGCA, MixReorg) and the fused scores of ``TwoStageOVSeg``."""
    cfg.MODEL.SEEN_CALIBRATION = CN()
    # γ, in logit units, subtracted from the logit of every seen name before the class softmax
    # (0 = off, the plain model). Choose it on held-out images: tools/search_calibration.py
    # (single-stage models), tools/search_ensemble.py --gammas (two-stage, jointly with λ).
    cfg.MODEL.SEEN_CALIBRATION.GAMMA = 0.0
    # The names the model was trained with; empty = the seen_classes metadata of DATASETS.TEST
    # and DATASETS.TRAIN.
    cfg.MODEL.SEEN_CALIBRATION.SEEN_NAMES = []
    # Leave the seen names that the datasets' metadata lists as ``stuff_names`` uncalibrated (the
    # toy world: its 5 stuff classes, all seen, while every unseen name is a thing). False: every
    # seen name is calibrated.
    cfg.MODEL.SEEN_CALIBRATION.EXEMPT_STUFF = True


def add_mixreorg_config(cfg):
    """MixReorg (Cai, Ren et al., ICCV 2023): mixed patch reorganisation on a GroupViT-style encoder
    built from the MODEL.CLIP image tower (the text tower stays frozen). Every default below that is
    not in the paper itself is project design (../shared/design/single_stage.md §4)."""
    cfg.MODEL.MIXREORG = CN()
    # L_c: image-tower blocks run on each image before the first group tokens join; mixing happens
    # on their output ("contextual mixing"). 0 = mix the raw patch embeddings (the no-context
    # ablation).
    cfg.MODEL.MIXREORG.CONTEXT_DEPTH = 3
    # Blocks per GroupViT stage, [6, 3, 3] for 12 blocks: the first entry includes the CONTEXT_DEPTH
    # blocks (its other blocks are the progressive layers), one entry per grouping stage plus the
    # final stage on the segment tokens. The sum may not exceed the tower's blocks (extra blocks are
    # dropped).
    cfg.MODEL.MIXREORG.DEPTHS = [6, 3, 3]
    # Group tokens (= segments out) of each grouping stage (GroupViT: 64 then 8).
    cfg.MODEL.MIXREORG.NUM_GROUP_TOKENS = [64, 8]
    # Grouping assignment in training: one-hot with straight-through gradient / Gumbel noise /
    # Gumbel-softmax temperature (GroupViT).
    cfg.MODEL.MIXREORG.HARD_ASSIGNMENT = True
    cfg.MODEL.MIXREORG.GUMBEL = True
    cfg.MODEL.MIXREORG.GUMBEL_TAU = 1.0
    # Assignment logits: 0 = GroupViT's scaled dot product q·k/sqrt(d); > 0 = cos(q, k) / this
    # temperature (sharper, feature-similarity grouping from the start).
    cfg.MODEL.MIXREORG.ASSIGN_COSINE_TEMPERATURE = 0.0
    # Start every grouping block as an average of its assigned tokens (identity value / output
    # projections, zero residual branches; project design, not GroupViT's): the pre-trained
    # tower's image-text alignment survives the new blocks. False: random blocks (GroupViT trains
    # from scratch).
    cfg.MODEL.MIXREORG.ALIGNED_INIT = True
    # Hidden width of the 2-layer MLP projecting segment tokens to D (GroupViT: 4096); 0 = a linear
    # projection initialised from the CLIP tower's own (keeps a pretrained CLIP's joint space).
    cfg.MODEL.MIXREORG.PROJ_HIDDEN = 4096
    # Freeze the patch embedding and the first FREEZE_AT image-tower blocks (0 = train all, as the
    # paper trains from scratch).
    cfg.MODEL.MIXREORG.FREEZE_AT = 0
    # Mix in training. False = the unmixed GroupViT-style model (L_orig only, same inference cost).
    cfg.MODEL.MIXREORG.MIXING = True
    # M: images per mixing tuple (Fig. 3 shows 2).
    cfg.MODEL.MIXREORG.NUM_MIX_IMAGES = 2
    # c: side of a mixing cell, in tokens (1 = every token is drawn independently).
    cfg.MODEL.MIXREORG.MIX_CELL = 1
    # Share of cells given to each tuple member (M entries); [] = uniform 1/M.
    cfg.MODEL.MIXREORG.MIX_SHARES = []
    # Progressive mixing: a cross-attention after each progressive block through which every mixed
    # token attends to the original tokens of its source image (original tokens attend to
    # themselves).
    cfg.MODEL.MIXREORG.PROGRESSIVE = True
    # Group tokens given to the restored sequences: "tuple_mean" (mean of the mixed sequences' group
    # tokens over the tuple; no original-branch information) or "original" (the image's own).
    cfg.MODEL.MIXREORG.RESTORE_GROUP_TOKENS = "tuple_mean"
    # Loss weights W_ORIG (L_orig, contrastive on original features), W_REST (L_rest, contrastive on
    # restored features) and W_SEG (L_seg, segmentation of mixed images); 0 skips that branch.
    cfg.MODEL.MIXREORG.ORIG_WEIGHT = 1.0
    cfg.MODEL.MIXREORG.REST_WEIGHT = 1.0
    cfg.MODEL.MIXREORG.SEG_WEIGHT = 1.0
    # Add the caption datasets' "hard_negatives" (e.g. shape-swapped captions) as extra text
    # negatives of L_orig and L_rest (not in the paper: False).
    cfg.MODEL.MIXREORG.HARD_NEGATIVES = False
    # Initial 1/τ of the learnable contrastive logit scale (GroupViT / CLIP: 1/0.07) and its clamp.
    cfg.MODEL.MIXREORG.LOGIT_SCALE_INIT = 1.0 / 0.07
    cfg.MODEL.MIXREORG.LOGIT_SCALE_MAX = 100.0
    # Captions L_seg classifies every mixed token among: "tuple" (those of its mixing tuple, the
    # paper) or "batch" (all captions of the batch, a harder, more text-aligning task).
    cfg.MODEL.MIXREORG.SEG_NEGATIVES = "tuple"
    # GroupViT's multi-label noun-prompt loss, scored per group: each image draws one noun of its
    # caption into a random MODEL.CLIP.TEMPLATES prompt; an image's score for a prompt pools its
    # groups' similarities to it; InfoNCE over the batch with every prompt whose noun the image's
    # caption names as a positive; on the original and restored branches (not in the paper).
    cfg.MODEL.MIXREORG.NOUN_PROMPTS = CN()
    # Weight of that loss (0 = off, the paper).
    cfg.MODEL.MIXREORG.NOUN_PROMPTS.WEIGHT = 0.0
    # Nouns from ov_seg.mining.NounExtractor: "noun" (single nouns) or "chunk" (noun chunks), and
    # the chunk source "parser" (spaCy's dependency parser) or "tagger" (POS tags only).
    cfg.MODEL.MIXREORG.NOUN_PROMPTS.NOUN_MODE = "noun"
    cfg.MODEL.MIXREORG.NOUN_PROMPTS.CHUNKER = "parser"
    # Parse the nouns of every DATASETS.TRAIN caption once before training (disk-cached); False:
    # parse per batch.
    cfg.MODEL.MIXREORG.NOUN_PROMPTS.DATASET_CACHE = True
    # Temperature of the softmax pooling of group-prompt similarities over an image's groups (0 =
    # max over the groups).
    cfg.MODEL.MIXREORG.NOUN_PROMPTS.POOL_TEMP = 0.1
    cfg.MODEL.MIXREORG.TEST = CN()
    # Pixel scores: False = the class scores of the pixel's argmax group (GroupViT); True = the
    # soft-assignment-weighted mix of all groups' class scores.
    cfg.MODEL.MIXREORG.TEST.SOFT_ASSIGNMENT = False
    # Group classification restricted to the image's top-k classes by pooled similarity (GroupViT:
    # 5; 0 = off).
    cfg.MODEL.MIXREORG.TEST.TOPK_CLASSES = 5
    # A vocabulary entry with this name is scored by a threshold, not by text: its score is
    # min(BG_THRESH, the image's max class score) (GroupViT: 0.95 VOC / COCO-Object, 0.35 Context).
    cfg.MODEL.MIXREORG.TEST.BACKGROUND_NAME = "background"
    cfg.MODEL.MIXREORG.TEST.BG_THRESH = 0.95
    # Sliding-window inference: window side and stride in pixels (GroupViT: 448 / 224); 0 = whole
    # image.
    cfg.MODEL.MIXREORG.TEST.SLIDE_WINDOW = 448
    cfg.MODEL.MIXREORG.TEST.SLIDE_STRIDE = 224


def add_clip_config(cfg):
    """CLIP used by every model (``ov_seg.modeling.clip``): which open_clip model, prompts, masked
    crops."""
    cfg.MODEL.CLIP = CN()
    # open_clip model name (open_clip.list_models(), or a project config such as
    # "ovseg-tiny-vit8-64"). Paper main setting: ViT-L/14 (with Swin-B); ViT-B/16 with R101c.
    cfg.MODEL.CLIP.MODEL_NAME = "ViT-L-14"
    # open_clip pretrained tag (needs network or a populated cache), a local checkpoint file (state
    # dict, {"state_dict": ...} or an exported clip_export.pth, mask prompts included), or ""
    # = random init.
    cfg.MODEL.CLIP.PRETRAINED = "openai"
    # MLP activation of both CLIP towers: "quick_gelu" (x·σ(1.702x), OpenAI's CLIP), "gelu", or
    # "auto": what the pretrained tag was trained with (open_clip's record: QuickGELU for "openai"),
    # else the activation a local checkpoint's meta records, else the model config's (GELU for
    # ViT-B-16 / ViT-L-14). Wrong activation = silently wrong embeddings.
    cfg.MODEL.CLIP.ACTIVATION = "auto"
    # Prompt template set of the text classifier (ov_seg.modeling.clip.TEMPLATE_SETS), for every
    # method's class embeddings and prompt augmentation: "vild" (14 ViLD templates, OVSeg),
    # "imagenet" (CLIP's 80), "clip7" (CLIP's 7-template ensemble, as quoted for PACL), "single"
    # ("a photo of a {}."), "toyworld".
    cfg.MODEL.CLIP.TEMPLATES = "vild"
    # Mask prompt depth (OVSeg: 3; 0 = no mask prompts): prompts replace the tokens of fully
    # masked-out patches at the input and after transformer blocks 1 .. depth-1.
    cfg.MODEL.CLIP.MASK_PROMPT_DEPTH = 3
    # Binarisation threshold of soft masks before cropping (OVSeg: 0.4; 0.5 for the R101c model).
    cfg.MODEL.CLIP.MASK_THR = 0.4
    # Expansion of the mask's box around its centre before cropping (OVSeg: 1.0 = the tight box).
    cfg.MODEL.CLIP.MASK_EXPAND_RATIO = 1.0
    # Crop a square box (side max(w, h)) so the crop keeps the mask's aspect ratio; OVSeg resizes
    # the (non-square) box to the square CLIP input (False).
    cfg.MODEL.CLIP.MASK_SQUARE_CROP = False
    # Fixed scale of the cosine logits between crop and text embeddings (OVSeg: 100).
    cfg.MODEL.CLIP.LOGIT_SCALE = 100.0
    # Train the text tower with a compact vocabulary (only the token ids of the training texts are
    # parameters; checkpoints keep the full table). For tiny from-scratch models.
    cfg.MODEL.CLIP.COMPACT_VOCAB = False
    # Directory of the on-disk cache of class-name embeddings, keyed by (text-tower weights hash,
    # template set, names), written atomically ("" = no disk cache; e.g. "~/.cache/ov_seg/text").
    cfg.MODEL.CLIP.TEXT_CACHE_DIR = ""
    # Masked crops per image-tower forward at inference; 0 = auto: on a CPU as many as keep one
    # MLP activation of the batch within 20 MiB of cache (ViT-B/16 at 224 px: 8, 30 % faster than
    # 100 at once; tiny towers: all), elsewhere 256. Outputs do not depend on it.
    cfg.MODEL.CLIP.CROP_BATCH_SIZE = 0


def add_clip_pretrain_config(cfg):
    """``CLIPPretrain``: image-caption contrastive training (symmetric InfoNCE, learnable logit
    scale)."""
    cfg.MODEL.CLIP_PRETRAIN = CN()
    # Add the dataset dicts' "hard_negatives" captions as extra text negatives of the image -> text
    # loss.
    cfg.MODEL.CLIP_PRETRAIN.HARD_NEGATIVES = True
    # Clamp of the learnable logit scale exp(t) (CLIP: 100).
    cfg.MODEL.CLIP_PRETRAIN.LOGIT_SCALE_MAX = 100.0
    # Freeze the text tower (fine-tune the image tower only, LiT-style); False = train both towers.
    cfg.MODEL.CLIP_PRETRAIN.LOCK_TEXT = False
    # In-batch texts that are no negatives of an image: "content" (captions, and other pairs' hard
    # negatives, that say what its caption says under the training datasets' "caption_templates"
    # metadata, else the same text), "exact" (the same text: case, runs of white space and a final
    # period ignored) or "none" (CLIP: every other text is a negative).
    cfg.MODEL.CLIP_PRETRAIN.FALSE_NEGATIVES = "content"


def add_mask_adapted_clip_config(cfg):
    """``MaskAdaptedCLIP``: masked crop -> image embedding, classified against category-name
    embeddings."""
    cfg.MODEL.MASK_ADAPTED_CLIP = CN()
    # What trains: "mpt" (mask prompts only, all CLIP weights frozen), "ft" (full fine-tune of the
    # image tower, no prompts), "ft_mpt" (both at once). The text tower is always frozen. OVSeg's
    # best is FT then MPT: a "ft" run, then an "mpt" run with MODEL.CLIP.PRETRAINED = the FT run's
    # clip_export.pth.
    cfg.MODEL.MASK_ADAPTED_CLIP.MODE = "mpt"
    # LOSS "classification": classes each crop is contrasted against: "batch" (the category names
    # present in the batch) or "dataset" (the whole vocabulary of the training dataset).
    cfg.MODEL.MASK_ADAPTED_CLIP.VOCABULARY = "batch"
    # Training-time mask jitter: each mask is dilated or eroded by up to this many pixels (or kept),
    # so the CLIP sees masks as imperfect as proposals (0 = exact masks).
    cfg.MODEL.MASK_ADAPTED_CLIP.MASK_JITTER = 0
    # Masked crops per training step at most (random subset of the batch's pairs; 0 = all).
    cfg.MODEL.MASK_ADAPTED_CLIP.MAX_CROPS = 0
    # Side of the training crops in pixels, drawn per step from this list (multiples of the patch
    # size; empty = the CLIP's input size). Several sizes adapt the CLIP and its mask prompts to
    # the smaller crops of MODEL.TWO_STAGE.FAST.CROP_SIZE; evaluation uses the input size.
    cfg.MODEL.MASK_ADAPTED_CLIP.TRAIN_CROP_SIZES = []
    # Training loss: "ovseg" (OVSeg's open_clip fine-tuning: each pair's name in a random
    # MODEL.CLIP.TEMPLATES template, CLIP's symmetric contrastive loss over the step's pairs, the
    # CLIP's learnable logit scale, clamped to 100) or "classification" (cross-entropy against the
    # prompt-ensembled names of VOCABULARY with the fixed MODEL.CLIP.LOGIT_SCALE).
    cfg.MODEL.MASK_ADAPTED_CLIP.LOSS = "ovseg"
    # LOSS "ovseg": pairs of the same category name are negatives of each other (True, OVSeg); False
    # leaves them out of each other's negatives (a step holds several pairs of one name).
    cfg.MODEL.MASK_ADAPTED_CLIP.SAME_NAME_NEGATIVES = True
    # Random-resized crop of each training crop: (min, max) area fraction, aspect 3/4-4/3, resized
    # back to the crop size (OVSeg: (0.9, 1.0)); (1.0, 1.0) = off.
    cfg.MODEL.MASK_ADAPTED_CLIP.RRC_SCALE = (0.9, 1.0)


def add_mask_category_input_config(cfg):
    """The "mask_category" dataset mapper: (mask, category name) pairs of an image."""
    cfg.INPUT.MASK_CATEGORY = CN()
    # Drop segments smaller than this many pixels (after augmentation).
    cfg.INPUT.MASK_CATEGORY.MIN_AREA = 16
    # Segments of a panoptic dataset: "instance" (one pair per segment) or "semantic" (segments of
    # the same category merged).
    cfg.INPUT.MASK_CATEGORY.GROUPING = "instance"
    # Pairs kept per training image at most (random subset; 0 = all).
    cfg.INPUT.MASK_CATEGORY.MAX_PAIRS = 0


def add_pacl_config(cfg):
    """PACL (Mukhoti et al., CVPR 2023): a trainable patch embedder on a frozen MODEL.CLIP, trained
    with the patch-aligned compatibility φ. Defaults not in the paper itself are project design
    (../shared/design/single_stage.md §2)."""
    cfg.MODEL.PACL = CN()
    # Patch embedder e_v by name (ov_seg.modeling.heads.pacl): "residual_mlp" (PACL:
    # e_v(u) = W_s u + W_2 ReLU(W_1 u)) or "clip_projection" (vanilla-patch baseline: CLIP's visual
    # projection on every patch token, nothing trained; evaluate with --eval-only).
    cfg.MODEL.PACL.EMBEDDER = "residual_mlp"
    # Hidden width of W_1 / W_2 of the residual MLP; 0 = D, the joint embedding dim (the paper).
    cfg.MODEL.PACL.EMBED_HIDDEN_DIM = 0
    # τ_p of the patch softmax a_i = softmax_i(cos(v_i, t) / τ_p) (quoted form: 1.0;
    # re-implementations: 0.1).
    cfg.MODEL.PACL.PATCH_SOFTMAX_TEMP = 1.0
    # Initial logit scale 1/τ of the InfoNCE on Φ (learnable; CLIP: 1/0.07) and its clamp.
    cfg.MODEL.PACL.LOGIT_SCALE_INIT = 1.0 / 0.07
    cfg.MODEL.PACL.LOGIT_SCALE_MAX = 100.0
    # Texts per chunk of the B x B matrix Φ (memory O(B * CHUNK_SIZE * (N + D))); <= 0: one chunk.
    cfg.MODEL.PACL.CHUNK_SIZE = 64
    # Pairs whose texts say the same thing are not negatives of each other (project design, not
    # the paper's): two images' noun prompts of the same noun, two captions with the same noun set
    # (without prompt augmentation: the same caption). False: every other pair of the batch is a
    # negative (plain InfoNCE).
    cfg.MODEL.PACL.EXCLUDE_SAME_TEXT = True
    # Recompute each chunk of Φ in the backward pass (activation checkpointing): memory stays
    # bounded as B grows, at the cost of a second forward of Φ.
    cfg.MODEL.PACL.CHECKPOINT_CHUNKS = True
    cfg.MODEL.PACL.PROMPT_AUG = CN()
    # Prompt augmentation: each image also pairs with one noun of its caption in a random template.
    cfg.MODEL.PACL.PROMPT_AUG.ENABLED = True
    # Nouns from ov_seg.mining.NounExtractor: "noun" (single nouns) or "chunk" (noun chunks).
    cfg.MODEL.PACL.PROMPT_AUG.NOUN_MODE = "noun"
    # Noun-chunk source of the extractor: "parser" (spaCy's dependency parser) or "tagger" (POS tags
    # only: ~2x faster, same nouns for ~92% of real captions).
    cfg.MODEL.PACL.PROMPT_AUG.CHUNKER = "parser"
    # Weight W of the noun-prompt loss: L = (L_caption + W L_noun) / (1 + W).
    cfg.MODEL.PACL.PROMPT_AUG.WEIGHT = 1.0
    # Parse the nouns of every DATASETS.TRAIN caption once before training (ov_seg.mining's disk
    # cache, shared with other users of the same extractor settings); False: parse per batch.
    cfg.MODEL.PACL.PROMPT_AUG.DATASET_CACHE = True
    cfg.MODEL.PACL.TEST = CN()
    # Stride of the test-time score map in pixels (stride trick: 4); the patch size or 0 = off.
    cfg.MODEL.PACL.TEST.INFER_STRIDE = 4
    # Stride trick: "shift" ((p / stride)^2 passes on shifted inputs, interleaved; the stride must
    # divide p) or "conv" (one pass, patch embedding at the stride, positional embedding resized
    # bicubically).
    cfg.MODEL.PACL.TEST.STRIDE_MODE = "shift"
    # Vocabulary names scored as background (datasets with a background class); otherwise argmax.
    cfg.MODEL.PACL.TEST.BG_CLASS_NAMES = ["background"]
    # Background rule: "entropy" (entropy of softmax_k(cos * logit scale) > BG_ENTROPY) or "score"
    # (max cosine < BG_SCORE).
    cfg.MODEL.PACL.TEST.BG_MODE = "entropy"
    cfg.MODEL.PACL.TEST.BG_ENTROPY = 1.5
    cfg.MODEL.PACL.TEST.BG_SCORE = 0.7


def add_mgca_config(cfg):
    """MGCA (Liu, Ge, Liu, Huang, arXiv 2403.03707): object-, region- and pixel-level alignment with
    pseudo correspondences and hard negatives, adaptive semantic unit at inference. The encoders are
    the MODEL.CLIP towers (text frozen). Every default below is project design
    (../shared/design/single_stage.md §3).
    """
    cfg.MODEL.MGCA = CN()
    # Image-tower blocks kept frozen (TCL's ie_freeze); -1 = all but the last (11 of 12 for
    # ViT-B/16), the number of blocks = the whole tower frozen, 0 = everything trains (patch
    # embedding included).
    cfg.MODEL.MGCA.FREEZE_AT = -1
    # Run the last image-tower block on the value path only (MaskCLIP / TCL ignore_last_attn): local
    # tokens.
    cfg.MODEL.MGCA.VALUE_PATH = True
    # Decoder g: pre-activation 3x3 conv layers (LayerNorm, GELU; TCL GDecoder: 2) after a bilinear
    # upsample by DECODER_UPSAMPLE (2: pixel embeddings Z at stride p/2).
    cfg.MODEL.MGCA.DECODER_LAYERS = 2
    cfg.MODEL.MGCA.DECODER_UPSAMPLE = 2
    # Entities e_bj of a caption: its noun chunks ("chunk") or nouns ("noun") from ov_seg.mining, at
    # most J_max = MAX_ENTITIES per image (a random subset when there are more), each encoded as
    # ENTITY_TEMPLATE.format(chunk without determiner); a caption without chunks is its own entity.
    cfg.MODEL.MGCA.ENTITY_MODE = "chunk"
    # Chunker of ov_seg.mining.NounExtractor: "parser" (spaCy dependency noun chunks) or "tagger"
    # (JJ* NN+ tag runs, about 2x faster).
    cfg.MODEL.MGCA.ENTITY_CHUNKER = "parser"
    cfg.MODEL.MGCA.MAX_ENTITIES = 3
    cfg.MODEL.MGCA.ENTITY_TEMPLATE = "a photo of a {}."
    # Initial (w, β) of the learnable grounding m_bj(x) = sigmoid(w cos(z_x, e_bj) + β) (TCL
    # sim2mask).
    cfg.MODEL.MGCA.GROUNDING_INIT = (10.0, -2.5)
    # Initial 1/τ of the learnable logit scale shared by every L_hn and L_nce (τ = 0.07), and its
    # clamp.
    cfg.MODEL.MGCA.LOGIT_SCALE_INIT = 1.0 / 0.07
    cfg.MODEL.MGCA.LOGIT_SCALE_MAX = 100.0
    # (λ_obj, λ_reg, λ_pix): L = λ_obj L_obj + λ_reg L_reg + λ_pix L_pix; a zero weight skips the
    # level (the obj -> +reg -> +pix ablation).
    cfg.MODEL.MGCA.LOSS_WEIGHTS = (1.0, 1.0, 1.0)
    # k_n: hardest negatives kept per L_hn term (<= 0: all valid negatives, the no-hard-sampling
    # ablation).
    cfg.MODEL.MGCA.K_NEG = 16
    # k_pix: positive pixels P_bj and hard negative pixels N_bj per entity (<= 0: all qualifying
    # pixels).
    cfg.MODEL.MGCA.K_PIX = 32
    # N_meta: meta-points per image (soft k-means on Z, grid init; 8 on the toy world), its
    # iterations and softmax temperature.
    cfg.MODEL.MGCA.NUM_META_POINTS = 16
    cfg.MODEL.MGCA.META_ITERS = 3
    cfg.MODEL.MGCA.META_TEMPERATURE = 0.1
    # θ_pos: positive units (grounding mass) and pixels (m) lie above it; θ_neg: hard negative
    # pixels below.
    cfg.MODEL.MGCA.POS_THRESH = 0.5
    cfg.MODEL.MGCA.NEG_THRESH = 0.2
    # Drop other images' meta-points that would be positive units of an entity (mass > θ_pos) from
    # its negatives (the cross-image analogue of U+; same-string texts are always dropped).
    cfg.MODEL.MGCA.FILTER_CROSS_IMAGE_UNITS = True
    cfg.MODEL.MGCA.TEST = CN()
    # Prediction unit: "adaptive" (adaptive semantic unit), "group" (fixed GROUP_NUM groups,
    # GroupViT-like) or "pixel" (TCL-like).
    cfg.MODEL.MGCA.TEST.UNIT_MODE = "adaptive"
    # Initial units of the adaptive semantic unit (0 = 2 x NUM_META_POINTS).
    cfg.MODEL.MGCA.TEST.UNIT_NUM = 0
    # Groups of the "group" unit (GroupViT's 8 output segments).
    cfg.MODEL.MGCA.TEST.GROUP_NUM = 8
    # Purity ρ a unit needs to give its own scores to its pixels, and how often an impure unit is
    # split in two before its pixels keep their pixel scores.
    cfg.MODEL.MGCA.TEST.UNIT_PURITY = 0.6
    cfg.MODEL.MGCA.TEST.UNIT_MAX_SPLITS = 2
    # Scores of a leaf still impure after the splits: "pixel" (its pixels keep their own scores, the
    # design) or "unit" (they take the leaf's unit scores).
    cfg.MODEL.MGCA.TEST.UNIT_IMPURE_LEAF = "pixel"
    # A vocabulary entry with this name is not scored by text: it gets the constant probability
    # BG_THRESH, so pixels whose max class probability is below it become background (TCL style;
    # 0 = never).
    cfg.MODEL.MGCA.TEST.BACKGROUND_NAME = "background"
    cfg.MODEL.MGCA.TEST.BG_THRESH = 0.0
    # Sliding-window inference: window and stride in pixels, multiples of the patch size (GroupViT /
    # TCL: 448 / 224); 0 = whole image.
    cfg.MODEL.MGCA.TEST.SLIDE_WINDOW = 0
    cfg.MODEL.MGCA.TEST.SLIDE_STRIDE = 0


def add_two_stage_config(cfg):
    """``TwoStageOVSeg`` (OVSeg): proposals -> masked crops -> mask-adapted CLIP (``MODEL.CLIP``),
    fused with the proposal head. Inference only; the stages train as ``ProposalMaskFormer`` and
    ``MaskAdaptedCLIP``."""
    cfg.MODEL.TWO_STAGE = CN()
    # Proposal source (ov_seg.modeling.proposal_sources): "maskformer" (the ProposalMaskFormer
    # described by MODEL.MASK_FORMER / PIXEL_DECODER / BACKBONE) or "precomputed" (mask files under
    # PROPOSAL_DIR).
    cfg.MODEL.TWO_STAGE.PROPOSAL_SOURCE = "maskformer"
    # Trained ProposalMaskFormer checkpoint (train_net's model_final.pth); "" = none (a merged
    # checkpoint in MODEL.WEIGHTS, which is loaded after it, or random init).
    cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS = ""
    # Directory of precomputed proposals, one <image stem>.npz / .json per image ("precomputed"
    # source).
    cfg.MODEL.TWO_STAGE.PROPOSAL_DIR = ""
    # lambda of the geometric ensemble p = p_proposal^(1 - lambda) * p_clip^lambda (1 = CLIP only, 0
    # = proposal head only). OVSeg: 0.7 for ADE-150/847, 0.6 for Pascal Context 59/459, 0.45 for
    # VOC-20 (0.6 in the paper).
    cfg.MODEL.TWO_STAGE.ENSEMBLE_WEIGHT = 0.7
    # lambda_s, the ensemble's CLIP exponent for the names the proposal head was trained on (the
    # test datasets' seen_classes metadata, or MODEL.SEEN_CALIBRATION.SEEN_NAMES); < 0 = lambda
    # (uniform; OVSeg's cross-dataset evaluation). OVSeg's code on a seen / unseen split of one
    # dataset (trainable_flag) uses 1 - lambda: the head weighs more on the names it knows.
    cfg.MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT = -1.0
    # Name appended to a single-class vocabulary, since classification is a softmax (OVSeg:
    # "others").
    cfg.MODEL.TWO_STAGE.BACKGROUND_NAME = "others"
    cfg.MODEL.TWO_STAGE.TEST = CN()
    # Outputs: semantic (sum_q p_q(c) sigmoid(m_q)) and panoptic (MaskFormer merge of the fused
    # classes).
    cfg.MODEL.TWO_STAGE.TEST.SEMANTIC_ON = True
    cfg.MODEL.TWO_STAGE.TEST.PANOPTIC_ON = False
    # Panoptic: keep proposals whose fused class probability (renormalised over the vocabulary)
    # times objectness exceeds this ...
    cfg.MODEL.TWO_STAGE.TEST.OBJECT_MASK_THRESHOLD = 0.8
    # ... and drop a proposal whose visible area / its own (sigmoid >= 0.5) area is below this.
    cfg.MODEL.TWO_STAGE.TEST.OVERLAP_THRESHOLD = 0.8
    # Fast inference (notes/fast_inference.md). The defaults are exact: outputs equal the plain
    # path (float rounding aside); the other settings trade accuracy for speed.
    cfg.MODEL.TWO_STAGE.FAST = CN()
    # Skip proposals whose objectness is below this before the CLIP stage (0 = keep all; the best
    # proposal is always kept).
    cfg.MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS = 0.0
    # Proposals whose binarised masks (MODEL.CLIP.MASK_THR) overlap a higher-scoring proposal with
    # IoU >= this reuse its CLIP probabilities instead of a crop of their own. 1.0 = identical masks
    # only (exact); > 1 = off.
    cfg.MODEL.TWO_STAGE.FAST.DUPLICATE_IOU = 1.0
    # How proposals get CLIP features: "crops" (one forward per masked crop, OVSeg) or
    # "single_pass" (one forward on the whole image, features read from its dense tokens).
    cfg.MODEL.TWO_STAGE.FAST.CLIP_MODE = "crops"
    # single_pass: "attention" (per-mask query tokens attending to the mask's patches, SAN-style
    # attention masking), "region" (per-mask sequences of the mask's tokens, attending only among
    # themselves) or "mean" (mask pooling of the projected dense tokens, FC-CLIP-style).
    cfg.MODEL.TWO_STAGE.FAST.SINGLE_PASS_POOLING = "attention"
    # single_pass "attention" / "region": the per-mask tokens join the last this many blocks.
    cfg.MODEL.TWO_STAGE.FAST.SINGLE_PASS_LAYERS = 3
    # single_pass: short side (pixels) the image is resized to; 0 = the CLIP's native input size.
    cfg.MODEL.TWO_STAGE.FAST.SINGLE_PASS_SIZE = 0
    # Quantization of the CLIP image tower's linear layers (CPU only): "none" or "int8_dynamic"
    # (int8 weights per output channel, activations quantized on the fly; applied at the first
    # forward, after all weights are loaded).
    cfg.MODEL.TWO_STAGE.FAST.QUANTIZE = "none"
    # crops: side (pixels, a multiple of the CLIP patch) of the masked crops; smaller crops have
    # fewer tokens (the positional embedding and mask prompts are interpolated); 0 = the CLIP's
    # native input size (OVSeg).
    cfg.MODEL.TWO_STAGE.FAST.CROP_SIZE = 0
    # With a smaller CROP_SIZE: the masks with the largest areas (this many per image; stuff regions
    # lose the most detail in small crops) keep crops of the CLIP's native input size. 0 = none.
    cfg.MODEL.TWO_STAGE.FAST.FULL_SIZE_CROPS = 0
    # Run the proposal network's convolutions in the channels-last memory format (faster on CPUs;
    # float rounding differs, so it is not an exact mode).
    cfg.MODEL.TWO_STAGE.FAST.CHANNELS_LAST = False


_ADDERS = [
    add_weights_config,
    add_deeplab_config,
    add_solver_config,
    add_input_config,
    add_runtime_config,
    add_swin_config,
    add_pixel_decoder_config,
    add_maskformer_config,
    add_panoptic_input_config,
    add_evaluation_config,
    add_mixreorg_config,
    add_clip_config,
    add_clip_pretrain_config,
    add_mask_adapted_clip_config,
    add_mask_category_input_config,
    add_pacl_config,
    add_mgca_config,
    add_seen_calibration_config,
    add_two_stage_config,
]


def add_ov_seg_config(cfg):
    """Add detectron2's DeepLab keys (WarmupPolyLR: SOLVER.POLY_LR_POWER / POLY_LR_CONSTANT_ENDING,
    INPUT.CROP.SINGLE_CATEGORY_MAX_AREA) and every ov_seg config node to ``cfg`` (a detectron2
    CfgNode from ``get_cfg()``).
    """
    for adder in _ADDERS:
        adder(cfg)
    return cfg


def _template_set_name(templates) -> str:
    """The ``TEMPLATE_SETS`` name of a list of templates (an old ``MODEL.PACL.TEMPLATES`` value)."""
    from ov_seg.modeling.clip.text_classifier import TEMPLATE_SETS

    templates = tuple(templates)
    for name, members in TEMPLATE_SETS.items():
        if tuple(members) == templates:
            return name
    raise ValueError(
        f"MODEL.PACL.TEMPLATES {list(templates)} is no template set of "
        "ov_seg.modeling.clip.TEMPLATE_SETS: add it there under a name and set "
        "MODEL.CLIP.TEMPLATES to that name"
    )


# Renamed keys, kept working for one release: old full key -> (new full key, converter of the old
# value or None). Loading a YAML or an option list that sets an old key sets the new one instead,
# with a FutureWarning. Remove an entry one release after its rename.
DEPRECATED_KEYS = {
    # one name for the clamp of every learnable logit scale (beside LOGIT_SCALE_INIT)
    "MODEL.MGCA.MAX_LOGIT_SCALE": ("MODEL.MGCA.LOGIT_SCALE_MAX", None),
    "MODEL.MIXREORG.MAX_LOGIT_SCALE": ("MODEL.MIXREORG.LOGIT_SCALE_MAX", None),
    # every method's prompts come from MODEL.CLIP.TEMPLATES (PACL had a list of its own)
    "MODEL.PACL.TEMPLATES": ("MODEL.CLIP.TEMPLATES", _template_set_name),
    # inference keys live under <METHOD>.TEST, as for MGCA, MixReorg and the two-stage model
    **{
        f"MODEL.PACL.{key}": (f"MODEL.PACL.TEST.{key}", None)
        for key in (
            "INFER_STRIDE",
            "STRIDE_MODE",
            "BG_CLASS_NAMES",
            "BG_MODE",
            "BG_ENTROPY",
            "BG_SCORE",
        )
    },
}


def _pop(node, key: str):
    """Remove the dotted ``key`` from a nested dict; ``(True, value)`` or ``(False, None)``."""
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return False, None
    if not isinstance(node, dict) or leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _deprecation(old: str, new: str) -> None:
    warnings.warn(
        f"Config key {old} is deprecated and will be removed in the next release: use {new}",
        FutureWarning,
        stacklevel=4,
    )


def upgrade_deprecated_keys(loaded) -> None:
    """Move every ``DEPRECATED_KEYS`` entry of ``loaded`` (a CfgNode / nested dict being merged) to
    its new key, converting the value, with a FutureWarning. An old key overrides its new key: in a
    file loaded with its ``_BASE_`` files (upgraded first), an old key was written in the file
    itself.
    """
    for old, (new, convert) in DEPRECATED_KEYS.items():
        found, value = _pop(loaded, old)
        if not found:
            continue
        _deprecation(old, new)
        value = convert(value) if convert else value
        *parents, leaf = new.split(".")
        node = loaded
        for part in parents:
            if part not in node:
                node[part] = type(node)()
            node = node[part]
        node[leaf] = value


class OVSegCfgNode(CN):
    """detectron2's ``CfgNode`` that accepts the renamed keys of ``DEPRECATED_KEYS`` for one release
    (YAML files and their ``_BASE_`` files, other configs, ``merge_from_list`` options), with a
    FutureWarning for each use."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        """detectron2's loader; each file's deprecated keys are upgraded after its bases merge."""
        loaded = super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        upgrade_deprecated_keys(loaded)
        return loaded

    def merge_from_other_cfg(self, cfg_other):
        """Merge ``cfg_other`` (e.g. a loaded YAML) after upgrading its deprecated keys."""
        cfg_other = type(self)(cfg_other)
        upgrade_deprecated_keys(cfg_other)
        return super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list):
        """Merge ``[key, value, ...]`` options, deprecated keys replaced by their new names (and
        their values converted)."""
        cfg_list = list(cfg_list)
        for i in range(0, len(cfg_list) - 1, 2):
            if cfg_list[i] in DEPRECATED_KEYS:
                new, convert = DEPRECATED_KEYS[cfg_list[i]]
                _deprecation(cfg_list[i], new)
                if convert:
                    cfg_list[i + 1] = convert(CN._decode_cfg_value(cfg_list[i + 1]))
                cfg_list[i] = new
        return super().merge_from_list(cfg_list)
