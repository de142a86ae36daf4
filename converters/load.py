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


class CheckpointError(ValueError):
    pass


_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "slice"),
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
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
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


def to_numpy_state_dict(obj, path: Path) -> dict[str, np.ndarray]:
    """Unwraps {'model': ...} / {'state_dict': ...}, strips a DDP 'module.' prefix, and
    converts tensors to numpy."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "blobs" in obj and isinstance(obj["blobs"], dict):
        obj = obj["blobs"]
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
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            out[k] = v
    if not out:
        raise CheckpointError(f"{path} contains no tensors")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def read_checkpoint(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".pkl" or (head[:1] == b"\x80" and not zipfile.is_zipfile(path)):
        obj = _load_pkl(path)
    else:
        obj = _load_torch(path)
    return to_numpy_state_dict(obj, path)


def detect_format(sd: dict) -> str:
    """Which framework wrote this state dict, from its key names."""
    keys = list(sd)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("backbone.body.") and has("roi_heads.box_predictor."):
        return "torchvision"
    if has("backbone.bottom_up."):
        return "detectron2"
    if has("backbone.body.stem.") or has("roi_heads.box.feature_extractor."):
        return "maskrcnn_benchmark"
    if has("neck.lateral_convs.") or has("roi_head.bbox_head."):
        return "mmdet"
    if "conv1_w" in sd or has("res2_0_branch2a"):
        return "detectron"
    return "unknown"


