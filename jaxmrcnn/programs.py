"""Traced model programs kept on disk (jax.export), so that a new process skips tracing.

Tracing and lowering the whole Mask R-CNN takes ~3 s on a CPU, every process, for every
canvas bucket, even when XLA's persistent compilation cache holds the compiled code. A
`ProgramCache` stores each (function, argument shapes) as a serialized `jax.export.Exported`
and later rebuilds the jitted function from it in ~0.3 s; the compilation cache then serves
the compiled code.

The key covers everything the program depends on: the caller's name for it (which must
encode any static configuration: the Detector's names the model config, the matmul precision,
the compute dtype and the device count), the argument tree with shapes and dtypes, the
argument and result shardings (a program split over N devices is exported for N devices),
the compiler options, the backend and device kind it runs on, the versions of every
library that shapes the traced program (jax, jaxlib, flax, numpy: `environment()`), and a
digest of this package's source code, so an edited jaxmrcnn never reuses a stale program. A
file that cannot be read back (truncated, from another version) is replaced by a fresh
export.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np

from jaxmrcnn.checkpoint import atomic_write

PACKAGE = Path(__file__).resolve().parent


@functools.cache
def source_digest() -> str:
    """sha256 of every .py file of the jaxmrcnn package (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def environment() -> dict[str, str]:
    """What, besides the function and its arguments, changes a traced program: where it runs
    and the libraries that trace it."""
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }


def _signature(args) -> str:
    leaves, tree = jax.tree_util.tree_flatten(args)
    shapes = [(tuple(x.shape), str(x.dtype)) for x in leaves]
    return f"{tree}|{shapes}"


def _shardings(shardings: dict) -> str:
    """The devices' count and the partition specs of jit's in_shardings / out_shardings."""
    def describe(s):
        return f"{getattr(s, 'spec', s)}@{s.num_devices}"

    return repr({k: [describe(s) for s in jax.tree_util.tree_leaves(v)]
                 for k, v in sorted(shardings.items())})


class ProgramCache:
    """`get(name, fn, args)`: a jitted callable equivalent to `jax.jit(fn)` for arguments
    shaped like `args`, from disk when this program was exported before."""

    def __init__(self, directory, compiler_options: dict | None = None):
        self.directory = Path(directory)
        self.compiler_options = compiler_options

    def key(self, name: str, args, shardings: dict | None = None) -> str:
        parts = [name, _signature(args), repr(sorted((self.compiler_options or {}).items())),
                 repr(sorted(environment().items())), source_digest()]
        if shardings:  # absent for one device: keys (and files) as before shardings existed
            parts.append(_shardings(shardings))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]

    def path(self, name: str, args, shardings: dict | None = None) -> Path:
        label = "".join(c if c.isalnum() else "_" for c in name.split("|")[0])[:40]
        return self.directory / f"{label}-{self.key(name, args, shardings)}.jaxexport"

    def get(self, name: str, fn: Callable, args, **shardings) -> Callable:
        """`shardings`: jax.jit's in_shardings / out_shardings, for a program over several
        devices (the export then holds them; it runs on as many devices)."""
        path = self.path(name, args, shardings)
        exported = self._read(path)
        if exported is None:
            spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
            exported = jax.export.export(jax.jit(fn, **shardings))(*spec)
            try:
                atomic_write(path, exported.serialize())
            except OSError as e:  # a read-only cache only costs speed
                warnings.warn(f"could not save the traced program to {path}: {e}", stacklevel=2)
        return jax.jit(exported.call, compiler_options=self.compiler_options, **shardings)

    @staticmethod
    def _read(path: Path):
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            return jax.export.deserialize(bytearray(data))
        except Exception:  # truncated or foreign file: export again (overwrites it)
            return None
