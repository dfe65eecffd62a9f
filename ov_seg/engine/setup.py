"""Config setup shared by the tools (train_net, demo, benchmark, mining)."""

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm

from ov_seg.config import OVSegCfgNode, add_ov_seg_config
from ov_seg.utils.threads import set_num_threads

__all__ = ["get_ov_seg_cfg", "setup_cfg"]


def get_ov_seg_cfg():
    """detectron2's default config + every ov_seg node, as an ``OVSegCfgNode`` (renamed keys of
    ``ov_seg.config.DEPRECATED_KEYS`` still merge, with a warning)."""
    cfg = get_cfg()
    add_ov_seg_config(cfg)
    return OVSegCfgNode(cfg)  # every node of one type: yacs merges a node only into its own type


def setup_cfg(args, default_setup_enabled: bool = True):
    """Build a frozen config from ``args.config_file`` and ``args.opts``; set torch threads.

    Args:
        args: parsed ``default_argument_parser()`` arguments.
        default_setup_enabled: run detectron2's ``default_setup`` (logging, output dir,
            config dump).
    """
    cfg = get_ov_seg_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    if default_setup_enabled:
        default_setup(cfg, args)
    set_num_threads(cfg.RUNTIME.NUM_THREADS, num_processes=max(1, comm.get_local_size()))
    return cfg
