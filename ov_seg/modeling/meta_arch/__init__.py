"""Meta-architectures (``@META_ARCH_REGISTRY`` classes only)."""
