"""One safe way to read every weights file the project loads.

Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` files (its model-zoo format) with a plain
``pickle.load``: a crafted file runs arbitrary code when given as ``MODEL.WEIGHTS`` or named in
``last_checkpoint``. :class:`SafeCheckpointer` reads

* ``.pkl`` with :class:`RestrictedUnpickler`, which admits only builtin containers and numpy arrays
  (what Detectron2 / Detectron1 model-zoo files hold) and refuses any other global;
* ``.safetensors`` with ``safetensors.torch.load_file`` (when the package is installed);
* everything else with ``torch.load(..., weights_only=True)``.

A file that cannot be read is an error naming the file. Loading is strict: weights that miss
parameters of the model, hold parameters the model does not have, or have other shapes raise
:class:`IncompatibleCheckpointError` naming the file and the first keys of each kind, instead of
leaving part of the model randomly initialised. ``partial=True`` (``MODEL.WEIGHTS_PARTIAL`` for a
training run's ``MODEL.WEIGHTS``: an ImageNet backbone, fine-tuning from another head) loads what
matches and logs the rest. ``--resume`` falls back to the newest readable ``model_*.pth`` of the
output folder, with a warning, when the last checkpoint cannot be read; checkpoints are written
atomically (temporary file + rename).
"""

import glob
import io
import os
import pickle
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _filter_reused_missing_keys, _IncompatibleKeys

__all__ = [
    "SafeCheckpointer",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "IncompatibleCheckpointError",
    "safe_load_pickle",
    "safe_torch_load",
]

# keys shown per kind (missing / unexpected / shape) in an IncompatibleCheckpointError
SHOWN_KEYS = 5


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asked to import a global outside :data:`RestrictedUnpickler.ALLOWED`."""


class IncompatibleCheckpointError(RuntimeError):
    """Weights that do not fit the model (another architecture, another config)."""


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


def _incompatibility_message(path: str, incompatible: _IncompatibleKeys, missing: List[str]) -> str:
    parts = []
    for what, keys in (
        ("missing from the file", missing),
        ("not in the model", list(incompatible.unexpected_keys)),
        (
            "of another shape (key, file, model)",
            [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in incompatible.incorrect_shapes],
        ),
    ):
        if keys:
            more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{len(keys)} keys {what}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    return (
        f"weights file {path} does not match the model (another architecture or config?): "
        + "; ".join(parts)
        + ". Pass the weights of this config, or set MODEL.WEIGHTS_PARTIAL True to load only "
        "the matching keys (fine-tuning from partial weights)."
    )


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that never runs code from a file and loads strictly (see the
    module docstring).

    Drop-in: same constructor, ``load`` / ``resume_or_load`` / ``save`` as Detectron2's.

    Args:
        partial: let ``resume_or_load(path, resume=False)`` / ``load`` load weights that match
            the model only in part (the rest stays as initialised; logged). Resuming from the
            output folder's own checkpoints is always strict.
    """

    def __init__(self, model, save_dir: str = "", *, partial: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.partial = bool(partial)
        self._strict = not self.partial
        self._path = ""
        self._preloaded: Optional[tuple] = None  # (path, data) read by _resume

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """Detectron2's ``load``; a local file that does not exist is a ``FileNotFoundError``."""
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        self._path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._path = ""

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume from the output folder's last readable checkpoint (strict) when ``resume`` and
        one exists, else load ``path`` (partial if the checkpointer was built so)."""
        if resume and self.has_checkpoint():
            return self._resume()
        return self.load(path, checkpointables=[])

    def _resume(self) -> Dict[str, Any]:
        last = self.get_checkpoint_file()
        others = sorted(
            (p for p in glob.glob(os.path.join(self.save_dir, "model_*.pth")) if p != last),
            key=lambda p: (os.path.getmtime(p), p),
            reverse=True,
        )
        failures = []
        for path in [last, *others]:
            try:
                data = self._load_file(path)
            except UnsafeCheckpointError:
                raise
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
                failures.append(f"{path}: {e}")
                self.logger.warning(
                    "cannot resume from %s (%s); trying an older checkpoint", path, e
                )
                continue
            if failures:
                self.logger.warning(
                    "resuming from %s: %d newer checkpoint(s) unreadable", path, len(failures)
                )
            self._preloaded = (path, data)
            self._strict = True
            try:
                return self.load(path)
            finally:
                self._preloaded = None
                self._strict = not self.partial
        raise RuntimeError(
            f"--resume: no readable checkpoint in {self.save_dir}: " + "; ".join(failures)
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """Detectron2's ``save``, written atomically: a run killed while saving leaves the
        previous checkpoint and ``last_checkpoint`` intact."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(data, tmp)
        os.replace(tmp, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, path)

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        incompatible = super()._load_model(checkpoint)
        missing = _filter_reused_missing_keys(self.model, incompatible.missing_keys)
        if self._strict and (
            missing or incompatible.unexpected_keys or incompatible.incorrect_shapes
        ):
            raise IncompatibleCheckpointError(
                _incompatibility_message(self._path, incompatible, sorted(missing))
            )
        return incompatible

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if self._preloaded is not None and self._preloaded[0] == filename:
            return self._preloaded[1]
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
