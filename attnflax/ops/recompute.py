"""The custom VJP of the memory-lean kernels: keep the inputs, the output and the
log-sum-exp; recompute everything else in the backward pass (flash-attention style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array


def recomputing_vjp(
    forward: Callable[..., tuple[Array, Any]],
    backward: Callable[[tuple[Any, ...], Array, Any, Array], tuple[Any, ...]],
) -> Callable[..., Array]:
    """A ``jax.custom_vjp`` function from a forward and a recomputing backward.

    Args:
      forward: ``forward(*args) -> (out, lse)``, the output and what the backward needs
        besides the inputs (a kernel's per-query log-sum-exp).
      backward: ``backward(args, out, lse, g) -> cotangents`` of `args` (one per argument,
        None for an argument that is None).

    Returns:
      ``f(*args) -> out``, differentiable, whose residuals are ``(args, out, lse)`` only.
    """

    @jax.custom_vjp
    def kernel(*args: Any) -> Array:
        return forward(*args)[0]

    def fwd(*args: Any) -> tuple[Array, tuple[Any, ...]]:
        out, lse = forward(*args)
        return out, (args, out, lse)

    def bwd(res: tuple[Any, ...], g: Array) -> tuple[Any, ...]:
        args, out, lse = res
        return tuple(backward(args, out, lse, g))

    kernel.defvjp(fwd, bwd)
    return kernel
