"""ONNX conversion of the exported program with jax2onnx, without custom ops.

jax2onnx converts most of the model's primitives (convolutions, while loops, sort, top_k,
gathers) but not the scatters the static-shape ops use: NMS appends kept boxes to fixed
buffers with `buf.at[slot].set(x, mode="drop")` (batched over images and levels, an
out-of-range slot meaning "dropped"), and ROIAlign accumulates chunks with
`acc.at[roi].add(part, mode="drop")`. ONNX's ScatterND has no drop mode (an out-of-range
index is an error), so instead of patching jax2onnx we rewrite those two scatter forms
before conversion, here and nowhere else (the core ops are unchanged):

    onehot[..., T, K] = (index[..., T] == arange(K))       # out of range: a row of zeros
    scatter:     out = where(any_T onehot, sum_T where(onehot, update, 0), operand)
    scatter-add: out = operand + sum_T where(onehot, update, 0)

The scatter is exact for NMS's buffers, whose in-range slots are distinct (each sum has
one term); the scatter-add sums a chunk's parts of one ROI (several with adaptive sampling)
in `sum`'s order, which may differ from XLA's scatter order in the last bit.

Other forms jax2onnx or onnxruntime lack, rewritten the same way: an n-way `cond`
(ROIAlign's switch over pyramid levels) becomes nested two-way conds; integer total-order
comparisons (`lt_to`, from jnp.searchsorted) ordinary ones; gathers with batching
dimensions (vmapped dynamic_slice / take_along_axis) their iota-indexed equivalent;
reduce_window_max (the stem's pool) the max of its strided taps; and selects, filled
gathers and batched loop carries of bool or small integer types run in a wider type
(onnxruntime has no Where for those). The rewrite is an interpreter over the traced jaxpr
that rebuilds while, scan and cond around rewritten bodies; jax2onnx converts what it binds.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal


def _onehot_scatter(kind: str, operand, indices, updates, dnums, mode):
    """`scatter` / `scatter-add` along one operand dimension, batched over leading ones, with
    unique in-range indices or dropped out-of-range ones (see the module docstring)."""
    nb = len(dnums.operand_batching_dims)
    d = nb  # the scattered operand dimension follows the batch dimensions
    ok = (
        tuple(dnums.operand_batching_dims) == tuple(range(nb))
        and tuple(dnums.scatter_indices_batching_dims) == tuple(range(nb))
        and tuple(dnums.scatter_dims_to_operand_dims) == (d,)
        and tuple(dnums.inserted_window_dims) == (d,)
        and indices.ndim == nb + 2 and indices.shape[-1] == 1
        and tuple(dnums.update_window_dims) == tuple(range(nb + 1, updates.ndim))
        and mode in (jax.lax.GatherScatterMode.FILL_OR_DROP,
                     jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    )
    if not ok:
        raise NotImplementedError(
            f"ONNX export: no rewrite for this {kind} form (operand {operand.shape}, indices "
            f"{indices.shape}, updates {updates.shape}, {dnums}, mode {mode}); "
            f"jaxmrcnn/export/onnx.py handles one scattered dimension after batch dimensions")
    k = operand.shape[d]
    onehot = indices[..., 0, None] == jnp.arange(k, dtype=indices.dtype)  # [*B, T, K]
    window = updates.shape[nb + 1:]
    hit = onehot.reshape(onehot.shape + (1,) * len(window))  # [*B, T, K, *W]
    upd = updates.reshape(updates.shape[: nb + 1] + (1,) + window)  # [*B, T, 1, *W]
    summed = jnp.sum(jnp.where(hit, upd, jnp.zeros((), updates.dtype)), axis=nb)  # [*B, K, *W]
    if kind == "scatter-add":
        return operand + summed
    written = jnp.any(onehot, axis=nb).reshape(operand.shape[: nb + 1] + (1,) * len(window))
    return jnp.where(written, summed, operand)


def _unbatched_gather(operand, indices, *, dimension_numbers, **params):
    """A gather with batching dimensions (what vmap makes of dynamic_slice and
    take_along_axis) as the equivalent one without: each batching dimension becomes a
    collapsed dimension indexed by an iota over the matching index dimension. jax2onnx
    mis-converts the batched form (a Slice on a wrong axis after its GatherND)."""
    dn = dimension_numbers
    if indices.ndim == 0 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise NotImplementedError(f"ONNX export: no rewrite for this gather ({dn})")
    batch_shape = indices.shape[:-1]  # the index vector is the last dimension (jax's form)
    iotas = [jax.lax.broadcasted_iota(indices.dtype, batch_shape, d)[..., None]
             for d in dn.start_indices_batching_dims]
    new = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(dn.offset_dims),
        collapsed_slice_dims=tuple(sorted((*dn.collapsed_slice_dims,
                                           *dn.operand_batching_dims))),
        start_index_map=(*dn.start_index_map, *dn.operand_batching_dims),
        operand_batching_dims=(), start_indices_batching_dims=())
    indices = jnp.concatenate([indices, *iotas], axis=-1)
    return jax.lax.gather_p.bind(operand, indices, dimension_numbers=new, **params)


def _bool_gather(eqn, vals):
    """A gather of a bool array computed on uint8: jax2onnx fills out-of-range rows with a
    Where, and onnxruntime has no Where kernel for bool data."""
    operand, indices = vals
    p = eqn.params
    if p["dimension_numbers"].operand_batching_dims:
        out = _unbatched_gather(operand.astype(jnp.uint8), indices, **p)
    else:
        out = jax.lax.gather_p.bind(operand.astype(jnp.uint8), indices, **p)
    return out != 0


# Selects whose data type onnxruntime's Where lacks, and the type they are computed in.
_WHERE_AS = {np.dtype(bool): jnp.uint8, np.dtype(np.uint32): jnp.int32,
             np.dtype(np.int8): jnp.int32, np.dtype(np.int16): jnp.int32,
             np.dtype(np.uint16): jnp.int32}


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding, base_dilation,
                        window_dilation):
    """reduce_window_max as the max of its strided window taps (exact): jax2onnx makes the
    stem's `[B, H, W, C]` 3x3 pool a MaxPool over four spatial axes, which onnxruntime
    refuses ("Unsupported pooling size")."""
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        raise NotImplementedError("ONNX export: no rewrite for a dilated reduce_window_max")
    x = jnp.pad(x, padding, constant_values=-jnp.inf)
    out_shape = [(n - w) // s + 1 for n, w, s in
                 zip(x.shape, window_dimensions, window_strides, strict=True)]
    out = None
    for offset in np.ndindex(*window_dimensions):
        limit = [o + (m - 1) * s + 1 for o, m, s in
                 zip(offset, out_shape, window_strides, strict=True)]
        tap = jax.lax.slice(x, offset, limit, window_strides)
        out = tap if out is None else jnp.maximum(out, tap)
    return out


# Total-order comparisons (lax.lt_to etc., which jnp.searchsorted emits): jax2onnx has no
# converter for them; on integers they are the ordinary comparisons.
_TOTAL_ORDER = {"lt_to": jax.lax.lt, "le_to": jax.lax.le, "eq_to": jax.lax.eq}


def _aval(x):
    a = jax.typeof(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _while(eqn, vals):
    """A while loop around rewritten bodies, bound directly (a vmapped loop's condition is
    batched, `[B]`, any-reduced by the primitive, which lax.while_loop would refuse), with
    bool carries held as uint8: for a batched condition jax2onnx masks the carries with a
    Where, which onnxruntime lacks for bool."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, init = vals[:nc], vals[nc:nc + nb], vals[nc + nb:]
    is_bool = [_aval(x).dtype == bool for x in init]

    def wide(xs):
        return [x.astype(jnp.uint8) if b else x for x, b in zip(xs, is_bool, strict=True)]

    def narrow(xs):
        return [x != 0 if b else x for x, b in zip(xs, is_bool, strict=True)]

    def cond(*args):
        return _eval_closed(p["cond_jaxpr"], *args[:nc], *narrow(args[nc:]))

    def body(*args):
        return wide(_eval_closed(p["body_jaxpr"], *args[:nb], *narrow(args[nb:])))

    init = wide(init)
    carry_avals = [_aval(x) for x in init]
    cond_j = jax.make_jaxpr(cond)(*map(_aval, cc), *carry_avals)
    body_j = jax.make_jaxpr(body)(*map(_aval, bc), *carry_avals)
    outs = eqn.primitive.bind(*cc, *bc, *init, **{**p, "cond_jaxpr": cond_j,
                                                  "body_jaxpr": body_j})
    return narrow(outs)


def _binary_switch(index, branches, ops):
    """lax.switch as nested two-way conds (jax2onnx converts only those to ONNX If):
    branch 0 when index <= 0, else the rest with index - 1 (the last one past the end, as
    lax.switch clamps)."""
    if len(branches) == 1:
        return branches[0](*ops)
    return jax.lax.cond(
        index <= 0, lambda *o: branches[0](*o),
        lambda *o: _binary_switch(index - 1, branches[1:], o), *ops)


def _eval_closed(closed: ClosedJaxpr, *args):
    return eval_rewritten(closed.jaxpr, closed.consts, *args)


def _binary_switch(index, branches, ops):
    """lax.switch as nested two-way conds (jax2onnx converts only those to ONNX If):
    branch 0 when index <= 0, else the rest with index - 1 (the last one past the end, as
    lax.switch clamps)."""
    if len(branches) == 1:
        return branches[0](*ops)
    return jax.lax.cond(
        index <= 0, lambda *o: branches[0](*o),
        lambda *o: _binary_switch(index - 1, branches[1:], o), *ops)


def _eval_closed(closed: ClosedJaxpr, *args):
    return eval_rewritten(closed.jaxpr, closed.consts, *args)


def _rewrite_closed(closed: ClosedJaxpr) -> ClosedJaxpr:
    """`closed` with its scatters rewritten, as a new closed jaxpr of the same signature."""
    avals = [v.aval for v in closed.jaxpr.invars]
    return jax.make_jaxpr(partial(_eval_closed, closed))(*avals)


def eval_rewritten(jaxpr, consts, *args):
    """Evaluates `jaxpr` as jax.core.eval_jaxpr does, with the scatters rewritten (inside
    jit, while, scan, cond and custom_jvp bodies too)."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name, p = eqn.primitive.name, eqn.params
        if name in ("scatter", "scatter-add"):
            outs = [_onehot_scatter(name, *vals, p["dimension_numbers"], p["mode"])]
        elif name == "gather" and vals[0].dtype == bool:
            outs = [_bool_gather(eqn, vals)]
        elif name == "select_n" and vals[1].dtype in _WHERE_AS:
            which, *cases = vals
            wide = _WHERE_AS[cases[0].dtype]
            outs = [jax.lax.select_n(which, *(c.astype(wide) for c in cases))
                    .astype(cases[0].dtype)]
        elif name == "gather" and p["dimension_numbers"].operand_batching_dims:
            outs = [_unbatched_gather(*vals, **p)]
        elif name == "reduce_window_max":
            outs = [_max_pool_by_slices(*vals, **p)]
        elif name in _TOTAL_ORDER and all(jnp.issubdtype(x.dtype, jnp.integer) for x in vals):
            outs = [_TOTAL_ORDER[name](*vals)]  # on integers the total order is the usual one
        elif name in ("jit", "pjit"):
            outs = _eval_closed(p["jaxpr"], *vals)
        elif name == "custom_jvp_call":
            outs = _eval_closed(p["call_jaxpr"], *vals)
        elif name == "while":
            outs = _while(eqn, vals)
        elif name == "scan":
            nc, ncarry = p["num_consts"], p["num_carry"]
            c0, init, xs = vals[:nc], vals[nc:nc + ncarry], vals[nc + ncarry:]

            def step(carry, x, c0=c0, body=p["jaxpr"], ncarry=ncarry):
                out = _eval_closed(body, *c0, *carry, *x)
                return tuple(out[:ncarry]), tuple(out[ncarry:])

            carry, ys = jax.lax.scan(step, tuple(init), tuple(xs), length=p["length"],
                                     reverse=p["reverse"], unroll=p["unroll"])
            outs = [*carry, *ys]
        elif name == "cond":
            index, ops = vals[0], vals[1:]
            branches = [partial(_eval_closed, br) for br in p["branches"]]
            outs = _binary_switch(index, branches, ops)
        else:
            out = eqn.primitive.bind(*vals, **p)
            outs = out if eqn.primitive.multiple_results else [out]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def to_onnx(fn, specs, path, input_names, output_names, opset: int = 21):
    """Converts `fn(*arrays) -> tuple of arrays` for inputs shaped like `specs` to an ONNX file
    at `path` (large weights may go to a `path.data` beside it, jax2onnx's choice)."""
    import logging

    from jax2onnx import to_onnx as j2o

    closed = jax.make_jaxpr(fn)(*specs)
    consts = [np.asarray(c) if isinstance(c, jax.Array) else c for c in closed.consts]

    def rewritten(*args):
        return tuple(eval_rewritten(closed.jaxpr, consts, *args))

    # jax2onnx imports every plugin on first use and logs a traceback for each of its examples
    # whose optional package (equinox, dm-pix) is absent: harmless here, so kept quiet.
    logger = logging.getLogger("jax2onnx.plugins.plugin_system")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return j2o(rewritten, list(specs), model_name="jaxmrcnn", opset=opset,
                   return_mode="file", output_path=str(path), input_names=list(input_names),
                   output_names=list(output_names))
    finally:
        logger.setLevel(level)
