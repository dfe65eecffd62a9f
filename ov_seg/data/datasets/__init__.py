"""Dataset registration (on import)."""

from . import register_toyworld  # noqa: F401 (registration)
