"""Reading PyTorch / pickle checkpoints without executing code from them.

`.pth` / `.pt` files go through `torch.load(..., weights_only=True)`; `.pkl` files (Detectron,
Detectron2 model zoo) through a restricted unpickler that rebuilds numpy arrays, dicts and
lists and refuses every other global. Every failure is a CheckpointError that says what is
wrong with the file and what to do.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from jaxmrcnn.checkpoint import CheckpointError  # one error type for every bad file

_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "slice"),
    # Python 3's pickle protocol 2 stores bytes as _codecs.encode(text, "latin1"), which
    # only builds the bytes (torch's weights_only unpickler allows it too).
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to load: the pickle asks for {module}.{name}, and loading it could run "
            f"code. Only numpy arrays, dicts and lists are accepted in .pkl checkpoints."
        )


def _load_pkl(path: Path):
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, encoding="latin1").load()
        except CheckpointError:
            raise
        except Exception as e:  # corrupt bytes fail in many ways (KeyError on a bad memo
            # index, OverflowError on a huge FRAME length, ...): all mean "not readable"
            raise CheckpointError(
                f"{path} is not a readable pickle checkpoint ({type(e).__name__}: {e}); the file "
                f"may be truncated or not a checkpoint"
            ) from None


def _load_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading .pth/.pt checkpoints needs PyTorch: pip install 'jaxmrcnn[torch]'"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        inert = _inert_training_state(torch, path)
        if inert:  # e.g. mmengine's message hub: read with inert stand-ins, weights_only kept
            with torch.serialization.safe_globals([(_Inert, name) for name in inert]):
                return torch.load(path, map_location="cpu", weights_only=True)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects beyond tensors and plain "
            f"containers, and loading them would execute code from the file ({msg}). If you "
            f"trust it, re-save only the weights: torch.save(ckpt['model'] or model.state_dict(), "
            f"'weights.pth')"
        ) from None
    except Exception as e:  # torch raises many kinds (IndexError on text, RuntimeError, EOF)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({first}); it may be truncated, "
            f"corrupt, or a different kind of file"
        ) from None


# Objects that training frameworks pickle beside the weights and that inference never needs:
# mmengine's Runner stores HistoryBuffer objects (holding numpy arrays) in `message_hub`.
_INERT_GLOBALS = {
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "builtins.getattr",  # numpy's dtype pickles call it; here it builds an inert stand-in
}
_INERT_PREFIXES = ("numpy.dtypes.",)


class _Inert:
    """Stands in for a training-state object in a checkpoint: built from the pickle's data
    without running any of its class's code, and never used."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert_training_state(torch, path: Path) -> list[str]:
    """The globals a zip checkpoint needs beyond weights_only's, if all of them are known
    training state (see _INERT_GLOBALS); else [] (the file is refused)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    known = [n for n in names if n in _INERT_GLOBALS or n.startswith(_INERT_PREFIXES)]
    has_training_state = any(n.startswith("mmengine.") for n in names)
    return names if names and has_training_state and len(known) == len(names) else []


def unwrap(obj) -> tuple[object, dict]:
    """The state dict inside a framework's container, and what the container says about it:
    `{"container": "{'model': ...}", "meta": obj['meta'] if any, "extra_keys": [...]}`."""
    info: dict = {"container": "", "meta": None, "extra_keys": []}
    if not isinstance(obj, dict):
        return obj, info
    for key in ("state_dict", "model", "blobs"):
        if key in obj and isinstance(obj[key], dict):
            info["container"] = f"{{'{key}': ...}}"
            info["meta"] = obj.get("meta") if isinstance(obj.get("meta"), dict) else None
            info["extra_keys"] = sorted(str(k) for k in obj if k != key)
            return obj[key], info
    return obj, info


def to_numpy_state_dict(obj, path: Path, info: dict | None = None) -> dict[str, np.ndarray]:
    """Unwraps {'model': ...} / {'state_dict': ...} / {'blobs': ...}, strips a DDP 'module.'
    prefix, and converts tensors to numpy. `info` (if given) receives unwrap()'s notes."""
    obj, notes = unwrap(obj)
    if info is not None:
        info.update(notes)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path} holds no state dict (a mapping from parameter names to tensors); got "
            f"{type(obj).__name__}"
        )
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: state dict key {k!r} is not a string")
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.is_floating_point() and v.element_size() < 4:  # bf16 has no numpy dtype
                v = v.float()  # bf16 / fp16 -> float32 is exact
            v = v.numpy()
        if isinstance(v, np.ndarray):
            out[k] = _upcast_half(v)
    if not out:
        raise CheckpointError(f"{path} contains no tensors")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
        if info is not None:
            info["module_prefix"] = True
    return out


def _upcast_half(v: np.ndarray) -> np.ndarray:
    """float16 / bfloat16 arrays as float32 (exact: every half value is a float32 value), so
    half-precision checkpoints convert to the same float32 params as their upcast."""
    if (v.dtype.kind == "f" and v.dtype.itemsize < 4) or v.dtype.name == "bfloat16":
        return v.astype(np.float32)
    return v


# torch.save's legacy (pre-1.6) format begins with this number, pickled.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_torch_legacy(path: Path) -> bool:
    """Whether a pickle-start file is PyTorch's legacy serialization (its first pickled
    object is torch's magic number); read with the restricted unpickler, so no code runs."""
    with open(path, "rb") as f:
        try:
            first = _RestrictedUnpickler(f, encoding="latin1").load()
        except Exception:  # not even one plain object: let the pickle reader explain
            return False
    return isinstance(first, int) and first == _TORCH_LEGACY_MAGIC


def read_checkpoint(path, info: dict | None = None) -> dict[str, np.ndarray]:
    """The flat state dict (name -> np.ndarray) of a checkpoint file. `info`, if given,
    receives what the container held (see unwrap)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        obj = _load_torch(path)
    elif head[:1] == b"\x80" or path.suffix == ".pkl":
        # A pickle: PyTorch < 1.6's torch.save (maskrcnn-benchmark, Matterport), which
        # torch.load(weights_only=True) reads, or a plain pickle (Detectron, Detectron2 zoo).
        obj = _load_torch(path) if _is_torch_legacy(path) else _load_pkl(path)
    else:
        obj = _load_torch(path)
    return to_numpy_state_dict(obj, path, info)


def detect_format(sd: dict) -> str:
    """Which framework wrote this state dict, from its key names ("unknown" if none)."""
    from jaxmrcnn.converters.from_torch import detect_format as detect

    return detect(sd)
