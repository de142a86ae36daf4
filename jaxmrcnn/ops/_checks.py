"""Argument checks shared by the ops: clear ValueErrors that name the argument.

These run at trace time on static shapes and dtypes only, so they cost nothing inside jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def check_boxes(name: str, boxes, *, rank: int | Sequence[int] | None = None) -> None:
    """Checks that `boxes` is a floating array of shape [..., 4]."""
    shape = getattr(boxes, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array of boxes [..., 4], got {type(boxes).__name__}")
    if len(shape) == 0 or shape[-1] != 4:
        raise ValueError(
            f"{name} must have last dimension 4 (x1, y1, x2, y2), got shape {tuple(shape)}"
        )
    check_rank(name, boxes, rank)
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating array (got dtype {boxes.dtype}); "
            f"convert it with .astype(jnp.float32)"
        )


def check_rank(name: str, x, rank: int | Sequence[int] | None) -> None:
    if rank is None:
        return
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}, got shape {tuple(x.shape)}")


def check_shape_prefix(name: str, x, prefix: Sequence[int], ref_name: str) -> None:
    if tuple(x.shape[: len(prefix)]) != tuple(prefix):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, which does not match {ref_name} "
            f"(expected leading dimensions {tuple(prefix)})"
        )


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )
    return value
