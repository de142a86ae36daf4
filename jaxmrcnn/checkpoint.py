"""Converted checkpoints: params + model config + class list in one msgpack file.

Loading never executes code: the file is plain msgpack (numbers, strings, arrays), and
everything in it is checked before a model is built from it: the format version, the config
(config.validate), the class list against the class count, and every parameter's path,
shape and dtype against the model the config builds. Every problem is one CheckpointError
naming the file.

Writing goes to a temporary file that is fsynced and renamed into place (then the directory
is fsynced), so a failed write never leaves a truncated checkpoint behind or damages an
existing one; the file gets the usual permissions (0o644 less the umask).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from jaxmrcnn.config import ModelConfig, torchvision_maskrcnn_r50_fpn, validate
from jaxmrcnn.model import check_params, flatten_tree, init_params

MAGIC = "jaxmrcnn-checkpoint"
# 3: backbone.base_channels stored (files of version 2 and before had 64, every framework's);
# 2: every config field stored (1: torchvision only, fields added since are filled)
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FILE_MODE = 0o644  # less the umask, as files written the usual way
_SHOW = 5  # problems of each kind named in an error message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, what is wrong and
    what to do. (The converters' errors are this type too: jaxmrcnn.load raises only it.)"""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the path (also a FileNotFoundError)."""


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    params: dict  # Flax params tree of numpy arrays
    classes: list[str]  # name per class index
    category_ids: list[int]  # dataset category id per class index (-1: background / unused)
    source: dict  # provenance: source format, file name, notes

    def save(self, path, *, overwrite: bool = True) -> None:
        """Writes the checkpoint atomically; `overwrite=False`: FileExistsError if `path`
        exists (checked atomically: an existing file is never replaced)."""
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
        atomic_write(path, serialization.msgpack_serialize(payload), overwrite=overwrite)

    def validate(self, where) -> None:
        """Raises CheckpointError (naming `where`, the file) unless the config is valid,
        the class list and category ids have one entry per class, and the params are exactly
        the tree the config's model expects: every path, shape and dtype."""
        try:
            validate(self.config)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}. Re-convert the source checkpoint with "
                                  f"this jaxmrcnn's converter") from None
        k = self.config.roi_heads.num_classes
        for field, kind in (("classes", str), ("category_ids", int)):
            value = getattr(self, field)
            if not isinstance(value, list) or not all(
                    isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise CheckpointError(f"{where}: '{field}' must be a list of "
                                      f"{kind.__name__}, got {str(value)[:80]}")
            if len(value) != k:
                raise CheckpointError(
                    f"{where}: {len(value)} {field} for a model of {k} classes (num_classes, "
                    f"background included); the file is damaged or was edited by hand: "
                    f"re-convert the source checkpoint")
        problems = param_problems(self.config, self.params)
        if problems:
            raise CheckpointError(
                f"{where}: the params do not fit the model its config builds "
                f"({self.config.name}):\n  " + "\n  ".join(problems)
                + "\nThe file is damaged or was written for another model: re-convert it.")


@functools.lru_cache(maxsize=8)
def expected_params(cfg: ModelConfig) -> dict:
    """{"a/b/kernel": ShapeDtypeStruct} of the params `cfg`'s model has (no allocation)."""
    return dict(flatten_tree(jax.eval_shape(lambda: init_params(cfg))))


def param_problems(cfg: ModelConfig, params) -> list[str]:
    """Lines naming (a few of each) non-array leaves, missing, unexpected and mis-shaped
    params (model.check_params) and params of the wrong dtype; [] if the tree fits."""
    if not isinstance(params, dict):
        return [f"params must be a tree of arrays, got {type(params).__name__}"]
    not_arrays = [f"{k} ({type(v).__name__})" for k, v in flatten_tree(params)
                  if not isinstance(v, np.ndarray)]
    if not_arrays:
        return [f"not arrays ({len(not_arrays)}): " + "; ".join(not_arrays[:_SHOW])]
    try:
        want = expected_params(cfg)
    except Exception as e:  # a config that passes validate but cannot build the model
        return [f"its config cannot build a model ({type(e).__name__}: {str(e)[:200]})"]
    shapes = _unflatten({k: tuple(v.shape) for k, v in want.items()})
    out = []
    try:
        check_params(cfg, params, shapes)
    except ValueError as e:
        out += [_shorten(line.strip()) for line in str(e).splitlines()[1:]]
    got = dict(flatten_tree(params))
    bad = [f"{k}: {got[k].dtype} vs expected {want[k].dtype}"
           for k in sorted(set(want) & set(got)) if got[k].dtype != want[k].dtype]
    if bad:
        out.append(f"dtype mismatches ({len(bad)}): " + "; ".join(bad[:_SHOW]))
    return out


def _shorten(line: str) -> str:
    """check_params' "title (n): a; b; c; ..." with at most _SHOW items."""
    head, sep, items = line.partition(": ")
    parts = items.split("; ")
    return head + sep + "; ".join(parts[:_SHOW]) + (" ..." if len(parts) > _SHOW else "")


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes, *, overwrite: bool = True) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, gives it mode 0o644 less
    the umask (mkstemp's is 0o600), renames it into place and fsyncs the directory: an
    interrupted write never leaves a truncated file or damages an existing one.
    `overwrite=False`: FileExistsError if `path` exists, atomically (a hard link)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE & ~_umask())
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link_new(tmp: str, path: Path) -> None:
    """Puts `tmp` at `path` unless something is there: FileExistsError."""
    try:
        os.link(tmp, path)  # fails if path exists, atomically
    except FileExistsError:
        raise FileExistsError(f"{path} exists; not overwriting it") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting it") from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable (POSIX; a no-op where directories cannot be
    opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_checkpoint(path) -> Checkpoint:
    """The checkpoint in a converted file, validated (see Checkpoint.validate). Every problem
    is a CheckpointError naming the file (CheckpointNotFoundError when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no converted checkpoint at {path}")
    convert = ("Convert a PyTorch checkpoint first: python converters/from_torch.py CKPT "
               f"--out {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several types for corrupt data
        raise CheckpointError(
            f"{path} is not a jaxmrcnn checkpoint, or is truncated (cannot be decoded: "
            f"{str(e)[:200]}). {convert}"
        ) from None
    if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
        raise CheckpointError(
            f"{path} is not a jaxmrcnn checkpoint (missing the '{MAGIC}' marker). {convert}"
        )
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: the checkpoint version is {version!r}, not a number; "
                              f"the file is damaged: re-convert it")
    if version > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version}, newer than this jaxmrcnn reads (up to "
            f"{VERSION}); upgrade jaxmrcnn, or convert the source checkpoint with this version"
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint version {version}, this jaxmrcnn reads versions "
            f"{READABLE_VERSIONS}; re-convert it with this version's converter"
        )
    missing = [k for k in ("config", "params", "classes", "category_ids") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; the file is damaged: re-convert it")
    # Version 1 files came from torchvision only, before the convention fields existed:
    # those take torchvision's values.
    fill = torchvision_maskrcnn_r50_fpn() if version == 1 else None
    try:
        config_json = payload["config"]
        if version == 2:  # base_channels came with version 3; every earlier model had 64
            data = json.loads(config_json)
            if isinstance(data, dict) and isinstance(data.get("backbone"), dict):
                data["backbone"].setdefault("base_channels", 64)
            config_json = json.dumps(data)
        config = ModelConfig.from_json(config_json, fill_from=fill)
    except (ValueError, TypeError) as e:  # JSON errors are ValueErrors; a non-string TypeError
        raise CheckpointError(f"{path}: its model config cannot be read: {str(e)[:300]}. "
                              f"Re-convert the source checkpoint") from None
    source = payload.get("source", {})
    ckpt = Checkpoint(
        config=config,
        params=payload["params"],
        classes=payload["classes"],
        category_ids=payload["category_ids"],
        source=dict(source) if isinstance(source, dict) else {},
    )
    ckpt.validate(path)
    return ckpt
