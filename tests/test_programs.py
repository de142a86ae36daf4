"""The traced-program cache (jaxmrcnn/programs.py): a program exported by one cache is read
back by another (no tracing), computes the same thing, and a damaged file is replaced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmrcnn import programs
from jaxmrcnn.programs import ProgramCache


def fn(params, x):
    return {"y": jnp.tanh(x @ params["w"]) + params["b"], "n": jnp.sum(x > 0)}


@pytest.fixture
def args():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "b": jnp.ones(3, jnp.float32),
    }
    return params, jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)


def _no_tracing(*a, **k):
    raise AssertionError("the program was exported (traced) again")


def test_second_cache_reads_the_program_back(tmp_path, args, monkeypatch):
    want = jax.jit(fn)(*args)
    got = ProgramCache(tmp_path).get("f|cfg", fn, args)(*args)
    (path,) = tmp_path.glob("f-*.jaxexport")
    monkeypatch.setattr(jax.export, "export", _no_tracing)
    again = ProgramCache(tmp_path).get("f|cfg", fn, args)(*args)
    for out in (got, again):
        np.testing.assert_array_equal(out["y"], want["y"])
        assert int(out["n"]) == int(want["n"])
    assert path.is_file()


def test_key_covers_name_shapes_options_and_source(tmp_path, args, monkeypatch):
    cache = ProgramCache(tmp_path)
    params, x = args
    base = cache.path("f|cfg", args)
    assert cache.path("f|other cfg", args) != base
    assert cache.path("f|cfg", (params, x[:2])) != base
    assert cache.path("f|cfg", (params, x.astype(jnp.bfloat16))) != base
    assert ProgramCache(tmp_path, {"xla_cpu_enable_fast_math": False}).path("f|cfg", args) != base
    monkeypatch.setattr(programs, "source_digest", lambda: "edited")
    assert cache.path("f|cfg", args) != base


def test_damaged_file_is_replaced(tmp_path, args):
    cache = ProgramCache(tmp_path)
    path = cache.path("f|cfg", args)
    path.write_bytes(b"not a program")
    out = cache.get("f|cfg", fn, args)(*args)
    np.testing.assert_array_equal(out["y"], jax.jit(fn)(*args)["y"])
    assert path.read_bytes() != b"not a program"
    assert ProgramCache._read(path) is not None


def test_unwritable_cache_only_warns(tmp_path, args):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not save the traced program"):
        out = ProgramCache(blocker / "programs").get("f|cfg", fn, args)(*args)
    np.testing.assert_array_equal(out["y"], jax.jit(fn)(*args)["y"])


class _Device:
    device_kind = "TPU v9 imaginary"


@pytest.mark.parametrize("component, patch", [
    ("backend", lambda m: m.setattr(jax, "default_backend", lambda: "tpu")),
    ("device kind", lambda m: m.setattr(jax, "devices", lambda *a: [_Device()])),
    ("jax version", lambda m: m.setattr(jax, "__version__", "9.9.9")),
    ("jaxlib version", lambda m: m.setattr(programs.jaxlib, "__version__", "9.9.9")),
    ("flax version", lambda m: m.setattr(programs.flax, "__version__", "9.9.9")),
    ("numpy version", lambda m: m.setattr(np, "__version__", "9.9.9")),
])
def test_key_covers_the_environment(tmp_path, args, monkeypatch, component, patch):
    """A program traced on another backend, device or library version is never reused."""
    cache = ProgramCache(tmp_path)
    base = cache.key("f|cfg", args)
    before = programs.environment()
    patch(monkeypatch)
    assert programs.environment() != before, component
    assert cache.key("f|cfg", args) != base, component
    monkeypatch.undo()
    assert cache.key("f|cfg", args) == base  # the key is a function of these, nothing else
