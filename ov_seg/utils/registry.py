"""Small helpers around detectron2's ``Registry``."""

from detectron2.utils.registry import Registry

__all__ = ["NamedRegistry", "get_registered"]


class NamedRegistry(Registry):
    """A detectron2 ``Registry`` whose ``register`` also accepts an explicit name (a config value):

    .. code-block:: python

        @MAPPERS.register("semantic")
        class SemanticDatasetMapper: ...
    """

    def register(self, obj=None):
        if isinstance(obj, str):
            name = obj

            def deco(func_or_class):
                self._do_register(name, func_or_class)
                return func_or_class

            return deco
        return super().register(obj)


def get_registered(registry, name: str, what: str):
    """Look ``name`` up in a ``Registry`` with an error that lists the known names.

    Args:
        registry: a ``detectron2.utils.registry.Registry``.
        name: the registered name asked for (usually a config value).
        what: what the name designates, for the message (e.g. "dataset mapper", "evaluator type").
    """
    known = sorted(k for k, _ in registry)
    if name not in known:
        raise KeyError(f"Unknown {what} {name!r}; known: {', '.join(known) or '(none registered)'}")
    return registry.get(name)
