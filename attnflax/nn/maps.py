"""Reading the attention maps that the attention layers sow."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

Array = jax.Array
SOW_NAME = "attention_weights"


def attention_maps(
    model: nn.Module, variables: Any, x: Array, **apply_kwargs: Any
) -> dict[str, Array]:
    """Runs ``model`` on ``x`` and returns every sown attention map by module path.

    The forward pass is the ordinary one (jitted), with the ``intermediates`` collection
    made mutable; models are called with ``train=False`` unless ``apply_kwargs`` says otherwise
    (pass ``train=None`` for modules without a ``train`` argument, or any other kwargs).

    Args:
      model: a Flax module whose attention layers sow ``attention_weights``.
      variables: its variables (``params`` and, if any, ``batch_stats``).
      x: the input batch.
      **apply_kwargs: extra keyword arguments of ``model.__call__``.

    Returns:
      ``{path: weights}``, ``path`` the ``/``-joined module path, e.g.
      ``'attention_block_0/attention'``; weights ``[batch, H, W, heads, kh, kw]`` for local
      and ``[batch, heads, q_len, kv_len]`` for global layers. A layer called ``n > 1``
      times appears as ``path#0`` ... ``path#n-1``.
    """
    return sown_maps(run_sowing(model, variables, x, **apply_kwargs))


def run_sowing(
    model: nn.Module, variables: Any, x: Array, *, capture_intermediates: Any = False,
    **apply_kwargs: Any,
) -> dict[tuple[str, ...], Any]:
    """Runs ``model`` (jitted) with ``intermediates`` mutable, as :func:`attention_maps`.

    Args:
      capture_intermediates: passed to ``model.apply`` (e.g. a filter that also records
        the attention layers' outputs).

    Returns:
      The ``intermediates`` collection flattened: ``{module path + (name,): values}``.
    """
    if "train" not in apply_kwargs and "train" in _call_arguments(model):
        apply_kwargs["train"] = False
    if apply_kwargs.get("train", 0) is None:
        del apply_kwargs["train"]
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    apply = functools.partial(model.apply, mutable=["intermediates"],
                              capture_intermediates=capture_intermediates, **apply_kwargs)
    _, state = jax.jit(apply)(variables, x)
    return traverse_util.flatten_dict(dict(state.get("intermediates", {})))


def sown_maps(flat: dict[tuple[str, ...], Any]) -> dict[str, Array]:
    """The attention maps in a flattened ``intermediates`` collection, by module path
    (``path#i`` for the i-th call of a layer called more than once)."""
    maps: dict[str, Array] = {}
    for key, values in flat.items():
        if key[-1] != SOW_NAME:
            continue
        path = "/".join(key[:-1])
        if len(values) == 1:
            maps[path] = values[0]
        else:
            maps.update({f"{path}#{i}": v for i, v in enumerate(values)})
    return maps


def _call_arguments(model: nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(type(model).__call__).parameters)
