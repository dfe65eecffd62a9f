"""One safe way to read every weights file the project loads.

Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` files (its model-zoo format) with a plain
``pickle.load``: a crafted file runs arbitrary code when given as ``MODEL.WEIGHTS`` or named in
``last_checkpoint``. :class:`SafeCheckpointer` reads

* ``.pkl`` with :class:`RestrictedUnpickler`, which admits only builtin containers and numpy arrays
  (what Detectron2 / Detectron1 model-zoo files hold) and refuses any other global;
* ``.safetensors`` with ``safetensors.torch.load_file`` (when the package is installed);
* everything else with ``torch.load(..., weights_only=True)``.

A file that cannot be read is an error naming the file.
"""

import io
import os
import pickle
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = [
    "SafeCheckpointer",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "safe_load_pickle",
    "safe_torch_load",
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asked to import a global outside :data:`RestrictedUnpickler.ALLOWED`."""


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals needed by numpy arrays.

    Builtin containers (dict, list, tuple, str, numbers) need no global lookup; a numpy array
    pickles as ``numpy.core.multiarray._reconstruct`` + ``numpy.ndarray`` + ``numpy.dtype``
    (``numpy._core`` under numpy 2). Every other ``module.name`` raises
    :class:`UnsafeCheckpointError`, so nothing in the file can call code (``os.system``,
    ``builtins.eval``, ``subprocess.Popen`` ...).
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
        }
    )

    def __init__(self, file, *, source: str = "<stream>", **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to unpickle global '{module}.{name}' (only numpy arrays and "
            "builtin containers are read from .pkl files). Convert the file with a trusted tool, "
            "e.g. torch.save(state_dict, 'model.pth') after loading it yourself, if you trust it."
        )


def safe_load_pickle(path: str) -> Any:
    """Read a ``.pkl`` with :class:`RestrictedUnpickler` (latin1, as Detectron2's model zoo)."""
    with PathManager.open(path, "rb") as f:
        data = f.read()
    return RestrictedUnpickler(io.BytesIO(data), source=path, encoding="latin1").load()


def safe_torch_load(path: str, **kwargs) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; errors name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file is not a readable weights-only torch file (the cause is chained).
    """
    if not PathManager.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    kwargs.setdefault("map_location", "cpu")
    try:
        with PathManager.open(path, "rb") as f:
            return torch.load(f, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 (re-raised with the file's name)
        raise RuntimeError(
            f"cannot read weights file {path}: {type(e).__name__}: {e}. Only weights-only torch "
            "files (tensors and builtin containers), safetensors and numpy-only .pkl files load."
        ) from e


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that never runs code from a file (see the module docstring).

    Drop-in: same constructor, ``load`` / ``resume_or_load`` / ``save`` as Detectron2's.
    """

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not PathManager.exists(filename):
            raise FileNotFoundError(f"weights file not found: {filename}")
        ext = os.path.splitext(filename)[1].lower()
        if ext == ".pkl":
            try:
                data = safe_load_pickle(filename)
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"cannot read weights file {filename}: {e}") from e
            if not isinstance(data, dict):
                raise RuntimeError(f"{filename}: expected a dict, got {type(data).__name__}")
            if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
                self.logger.info("Reading a file from '%s'", data["__author__"])
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 model zoo
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if ext == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise RuntimeError(f"{filename}: install `safetensors` to read it") from e
            return {"model": load_file(filename, device="cpu")}
        loaded = safe_torch_load(filename)
        if not isinstance(loaded, dict):
            raise RuntimeError(f"{filename}: expected a dict, got {type(loaded).__name__}")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded
