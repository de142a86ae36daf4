"""Converted checkpoints: params + model config + class list in one msgpack file.

Loading never executes code: the file is plain msgpack (numbers, strings, arrays).
Writing goes to a temporary file that is renamed into place, so a failed write never
leaves a truncated checkpoint behind or damages an existing one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from flax import serialization

from jaxmrcnn.config import ModelConfig, torchvision_maskrcnn_r50_fpn

MAGIC = "jaxmrcnn-checkpoint"
VERSION = 2  # 2: every config field stored (1: torchvision only, fields added since are filled)
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    params: dict  # Flax params tree of numpy arrays
    classes: list[str]  # name per class index
    category_ids: list[int]  # dataset category id per class index (-1: background / unused)
    source: dict  # provenance: source format, file name, notes

    def save(self, path) -> None:
        path = Path(path)
        payload = {
            "magic": MAGIC,
            "version": VERSION,
            "config": self.config.to_json(),
            "classes": list(self.classes),
            "category_ids": [int(i) for i in self.category_ids],
            "source": {k: str(v) for k, v in self.source.items()},
            "params": _to_numpy(self.params),
        }
        atomic_write(path, serialization.msgpack_serialize(payload))


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path` and renames it into place: an
    interrupted write never leaves a truncated file or damages an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no converted checkpoint at {path}")
    raw = path.read_bytes()
    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several types for corrupt data
        raise ValueError(
            f"{path} is not a jaxmrcnn checkpoint (cannot be decoded: {e}). Convert a PyTorch "
            f"checkpoint first: python converters/from_torch.py CKPT --out {path}"
        ) from None
    if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
        raise ValueError(
            f"{path} is not a jaxmrcnn checkpoint (missing the '{MAGIC}' marker). Convert a "
            f"PyTorch checkpoint with: python converters/from_torch.py CKPT --out {path}"
        )
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has checkpoint version {version}, this jaxmrcnn reads versions "
            f"{READABLE_VERSIONS}; re-convert it with this version's converter"
        )
    # Version 1 files came from torchvision only, before the convention fields existed:
    # those take torchvision's values.
    fill = torchvision_maskrcnn_r50_fpn() if version == 1 else None
    return Checkpoint(
        config=ModelConfig.from_json(payload["config"], fill_from=fill),
        params=payload["params"],
        classes=list(payload["classes"]),
        category_ids=[int(i) for i in payload["category_ids"]],
        source=dict(payload.get("source", {})),
    )
