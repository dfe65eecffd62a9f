"""Heads on top of decoders: MaskFormer class heads (``class_heads``) and the single-stage methods'
heads.

Import the module of the head you need; importing it registers its heads.
"""
