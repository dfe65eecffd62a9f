"""Extra backbones registered in detectron2's ``BACKBONE_REGISTRY``."""
