"""Models; importing registers the meta-architectures, backbones and heads."""

from . import backbone, meta_arch  # noqa: F401 (registration)
