"""Tests of the pure attention functions in :mod:`attnflax.ops`.

Every behaviour of the ops' contract (DESIGN.md, layer 1) is pinned here: agreement
with the plain-loop numpy reference (``tests/reference.py``) over many shapes,
full-window local attention == global attention, the returned weights, gradients
against finite differences, NaN-free edge cases, bfloat16, composition with JAX
transformations (including ``shard_map`` over 4 forced CPU devices), input validation,
and the memory layout of the blocked local attention (read from the compiled HLO). Every
implementation (``implementation=``) runs the same checks; the kernels are also checked
against each other with several blocks and chunks.

Everything is jitted: op-by-op dispatch would compile each primitive for each new
shape and be far slower than one compilation per case.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from attnflax import cosine_attention, local_cosine_attention_2d
from attnflax.ops import GLOBAL_IMPLEMENTATIONS, LOCAL_IMPLEMENTATIONS, window_validity
from attnflax.ops import attention as ops_attention
from attnflax.ops import global_attention as global_kernels
from attnflax.ops import local_attention as local_kernels
from attnflax.ops.pallas_local import pallas_halo_attention

try:  # `tests` as a package (rootdir on sys.path) or as pytest's rootless test dir.
    from tests.reference import (
        cosine_attention_ref,
        local_cosine_attention_2d_jnp_ref,
        local_cosine_attention_2d_ref,
    )
except ImportError:
    from reference import (
        cosine_attention_ref,
        local_cosine_attention_2d_jnp_ref,
        local_cosine_attention_2d_ref,
    )

REPO = Path(__file__).resolve().parents[1]
F32_TOL = {"atol": 2e-5, "rtol": 2e-5}
# Every kernel that runs on CPU: 'pallas' compiles for GPU/TPU only, and runs here in
# Pallas's interpreter ('pallas_interpret'), which computes in float32 only.
LOCAL_IMPLS = tuple(i for i in LOCAL_IMPLEMENTATIONS if i != "pallas")
LOCAL_F64_IMPLS = ("xla", "chunked")
XLA_LOCAL_IMPLS = ("xla", "chunked")  # compiled by XLA here: their memory plans mean something
GLOBAL_IMPLS = tuple(i for i in GLOBAL_IMPLEMENTATIONS if i != "cudnn")  # cudnn: GPU only


# --------------------------------------------------------------------------- #
# Helpers.                                                                    #
# --------------------------------------------------------------------------- #


def _normal(rng: np.random.Generator, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    return rng.normal(size=tuple(shape)).astype(dtype)


def _qkv(
    rng: np.random.Generator, lead: Sequence[int], d: int, dv: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random query, key ``[*lead, d]`` and value ``[*lead, dv]``."""
    lead = tuple(lead)
    return _normal(rng, lead + (d,)), _normal(rng, lead + (d,)), _normal(rng, lead + (dv or d,))


@partial(jax.jit, static_argnames=("window", "return_weights", "implementation"))
def _local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    window: tuple[int, int],
    return_weights: bool = False,
    implementation: str | None = None,
) -> Any:
    return local_cosine_attention_2d(
        q, k, v, window=window, logit_scale=scale, bias=bias, return_weights=return_weights,
        implementation=implementation,
    )


@partial(jax.jit, static_argnames=("return_weights", "implementation"))
def _global(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    return_weights: bool = False,
    implementation: str | None = None,
) -> Any:
    return cosine_attention(
        q, k, v, logit_scale=scale, bias=bias, mask=mask, return_weights=return_weights,
        implementation=implementation,
    )


def _scale(rng: np.random.Generator, heads: int, per_head: bool) -> np.ndarray:
    """A positive scale, scalar or ``[heads]``, up to the modules' clamp of 100."""
    if per_head:
        return rng.uniform(0.5, 100.0, size=(heads,)).astype(np.float32)
    return np.float32(rng.uniform(0.5, 20.0))


def _window_patches(x: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """``[b, H, W, h, c]`` -> zero-padded neighbourhoods ``[b, H, W, h, kh, kw, c]`` (numpy)."""
    kh, kw = window
    b, height, width = x.shape[:3]
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0), (0, 0)))
    out = np.zeros(x.shape[:4] + (kh, kw) + x.shape[4:], x.dtype)
    for oy in range(kh):
        for ox in range(kw):
            out[:, :, :, :, oy, ox] = padded[:, oy : oy + height, ox : ox + width]
    return out


def _relative_bias_to_global(bias: np.ndarray, height: int, width: int) -> np.ndarray:
    """Local table ``[h, kh, kw]`` -> global ``[h, H*W, H*W]`` bias (offset key - query)."""
    heads, kh, kw = bias.shape
    ys, xs = np.divmod(np.arange(height * width), width)
    dy = ys[None, :] - ys[:, None] + kh // 2
    dx = xs[None, :] - xs[:, None] + kw // 2
    assert dy.min() >= 0 and dy.max() < kh and dx.min() >= 0 and dx.max() < kw
    return bias[:, dy, dx]


def _seed(case: Any) -> int:
    """A seed from a test case, stable across runs (unlike ``hash`` of ``None`` on 3.11)."""
    return zlib.crc32(repr(case).encode())


def _is_finite_tree(tree: Any) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- #
# Agreement with the numpy reference.                                          #
# --------------------------------------------------------------------------- #

# (batch, height, width, heads, head_dim, value_dim, window, with_bias, per_head_scale)
LOCAL_CASES = [
    (1, 1, 1, 1, 4, 4, (1, 1), False, False),  # a single pixel
    (2, 5, 5, 2, 8, 8, (3, 3), True, True),  # odd image, one tile
    (1, 8, 8, 4, 4, 6, (3, 3), True, False),  # even image, 2x2 tiles of 4
    (1, 6, 9, 3, 5, 5, (5, 3), True, True),  # non-square image and window
    (1, 4, 7, 1, 3, 3, (9, 15), True, False),  # window larger than the image
    (1, 12, 10, 8, 2, 2, (7, 5), True, True),  # 8 heads, padded tiles
    (2, 9, 11, 2, 4, 4, (1, 3), False, True),  # 1-wide window axis
    (1, 17, 5, 1, 3, 2, (3, 7), True, False),  # 5 tiles of 4 with padding
    (1, 20, 3, 2, 3, 3, (11, 1), True, True),  # tall window, 1-wide
    (1, 7, 16, 2, 4, 4, (1, 1), True, False),  # 1x1 window: out = value
    (1, 3, 2, 5, 6, 4, (13, 13), False, True),  # huge window, tiny image
]


@pytest.mark.parametrize("impl", LOCAL_IMPLS)
@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
def test_local_matches_reference(case: tuple, impl: str) -> None:
    b, height, width, heads, d, dv, window, with_bias, per_head = case
    rng = np.random.default_rng(_seed(case))
    q, k, v = _qkv(rng, (b, height, width, heads), d, dv)
    scale = _scale(rng, heads, per_head)
    bias = _normal(rng, (heads,) + window) if with_bias else None
    ref_out, ref_weights = local_cosine_attention_2d_ref(
        q, k, v, window=window, logit_scale=scale, bias=bias, return_weights=True
    )
    if impl == "xla":  # the only kernel that builds the weights
        out, weights = _local(q, k, v, scale, bias, window=window, return_weights=True,
                              implementation=impl)
        assert weights.shape == (b, height, width, heads) + window
        np.testing.assert_allclose(weights, ref_weights, **F32_TOL)
    else:
        out = _local(q, k, v, scale, bias, window=window, implementation=impl)
    assert out.shape == (b, height, width, heads, dv) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, **F32_TOL)
    if window == (1, 1):
        np.testing.assert_allclose(out, v, **F32_TOL)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    dims=st.tuples(
        st.integers(1, 2),  # batch
        st.integers(1, 11),  # height
        st.integers(1, 11),  # width
        st.integers(1, 8),  # heads
        st.integers(1, 6),  # head_dim
    ),
    radii=st.tuples(st.integers(0, 6), st.integers(0, 6)),  # window = 2 * radius + 1
    with_bias=st.booleans(),
    per_head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_local_matches_reference_random_shapes(
    dims: tuple[int, ...], radii: tuple[int, int], with_bias: bool, per_head: bool, seed: int
) -> None:
    b, height, width, heads, d = dims
    window = (2 * radii[0] + 1, 2 * radii[1] + 1)
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, (b, height, width, heads), d)
    scale = _scale(rng, heads, per_head)
    bias = _normal(rng, (heads,) + window) if with_bias else None
    ref = local_cosine_attention_2d_ref(q, k, v, window=window, logit_scale=scale, bias=bias)
    for impl in LOCAL_IMPLS:
        out = _local(q, k, v, scale, bias, window=window, implementation=impl)
        np.testing.assert_allclose(out, ref, **F32_TOL, err_msg=impl)


# (q_len, kv_len, heads, bias shape or None, mask shape or None, per_head_scale); batch 2.
GLOBAL_CASES = [
    (5, 5, 1, None, None, False),
    (4, 7, 3, (2, 3, 4, 7), None, True),  # full bias
    (6, 3, 2, (3,), (6, 3), False),  # bias over keys, mask [q, k]
    (3, 8, 4, (4, 1, 8), (2, 1, 3, 8), True),  # per-head bias, per-batch mask
    (7, 7, 8, (7, 7), (8, 7, 7), True),  # 8 heads, per-head mask
    (2, 9, 2, (1, 1, 1, 1), (9,), False),  # mask over keys only
    (5, 4, 3, None, (2, 3, 5, 4), True),  # full mask
    (1, 6, 5, (2, 5, 1, 1), (1, 1, 1, 6), False),  # a single query
]


@pytest.mark.parametrize("impl", GLOBAL_IMPLS)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=str)
def test_global_matches_reference(case: tuple, impl: str) -> None:
    q_len, kv_len, heads, bias_shape, mask_shape, per_head = case
    rng = np.random.default_rng(_seed(case))
    q = _normal(rng, (2, q_len, heads, 5))
    k = _normal(rng, (2, kv_len, heads, 5))
    v = _normal(rng, (2, kv_len, heads, 3))
    scale = _scale(rng, heads, per_head)
    bias = None if bias_shape is None else _normal(rng, bias_shape)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.6
    ref_out, ref_weights = cosine_attention_ref(
        q, k, v, logit_scale=scale, bias=bias, mask=mask, return_weights=True
    )
    if impl == "xla":
        out, weights = _global(q, k, v, scale, bias, mask, return_weights=True,
                               implementation=impl)
        assert weights.shape == (2, heads, q_len, kv_len)
        np.testing.assert_allclose(weights, ref_weights, **F32_TOL)
    else:
        out = _global(q, k, v, scale, bias, mask, implementation=impl)
    assert out.shape == (2, q_len, heads, 3)
    np.testing.assert_allclose(out, ref_out, **F32_TOL)


# --------------------------------------------------------------------------- #
# A window covering the whole image is global attention.                        #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("height", "width", "window", "with_bias"),
    [(5, 7, (9, 13), True), (4, 4, (9, 11), False), (1, 6, (3, 11), True), (6, 3, (15, 5), True)],
)
def test_full_window_equals_global(
    height: int, width: int, window: tuple[int, int], with_bias: bool
) -> None:
    rng = np.random.default_rng(height * 100 + width)
    b, heads, d = 2, 3, 4
    q, k, v = _qkv(rng, (b, height, width, heads), d)
    scale = _scale(rng, heads, per_head=True)
    table = _normal(rng, (heads,) + window) if with_bias else None
    local = _local(q, k, v, scale, table, window=window)
    flat = [x.reshape(b, height * width, heads, -1) for x in (q, k, v)]
    bias = None if table is None else _relative_bias_to_global(table, height, width)
    full = _global(*flat, scale, bias)
    np.testing.assert_allclose(local.reshape(full.shape), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Returned weights.                                                           #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("height", "width", "window"), [(6, 5, (3, 3)), (9, 8, (7, 5)), (3, 4, (9, 9))]
)
def test_local_weights(height: int, width: int, window: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, (2, height, width, 3), 4, 5)
    bias = _normal(rng, (3,) + window)
    out, w = _local(q, k, v, np.float32(5.0), bias, window=window, return_weights=True)
    w = np.asarray(w)
    assert w.dtype == np.float32 and w.shape == (2, height, width, 3) + window
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    valid = window_validity(window, (height, width))  # [H, W, kh, kw]
    outside = np.broadcast_to(~valid[None, :, :, None], w.shape)
    assert np.all(w[outside] == 0.0), "out-of-image neighbours must get exactly zero weight"
    assert np.all(w[~outside] > 0.0)
    recon = np.einsum("byxhij,byxhijc->byxhc", w, _window_patches(v, window))
    np.testing.assert_allclose(out, recon, atol=1e-5, rtol=1e-5)


def test_window_validity() -> None:
    valid = window_validity((3, 5), (4, 6))
    assert valid.shape == (4, 6, 3, 5) and valid.dtype == bool
    assert valid[0, 0].sum() == 2 * 3  # corner: rows 0..1, cols 0..2
    assert valid[2, 3].all()  # interior
    assert not valid[0, 0, 0].any() and not valid[3, 5, :, -2:].any()


def test_global_weights_with_mask() -> None:
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, (2, 6, 3), 4, 5)
    mask = rng.random((2, 3, 6, 6)) < 0.5
    mask[0, 1, 2] = False  # an all-masked row
    out, w = _global(q, k, v, np.float32(4.0), None, mask, return_weights=True)
    w = np.asarray(w)
    assert w.dtype == np.float32 and w.shape == (2, 3, 6, 6)
    assert np.all(w >= 0) and np.all(w[~mask] == 0.0) and np.all(w[mask] > 0)
    np.testing.assert_allclose(w.sum(-1), mask.any(-1).astype(np.float32), atol=1e-5)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhc->bqhc", w, v), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[0, 2, 1] == 0.0)


# --------------------------------------------------------------------------- #
# Gradients against finite differences (float64).                             #
# --------------------------------------------------------------------------- #


def _check_grads_of_order(
    fn: Callable[..., jax.Array], args: tuple, order: int, modes: Sequence[str] = ("fwd", "rev")
) -> None:
    """Order 1: JVP and VJP against finite differences of ``fn``. Order 2: forward-over-
    reverse (Hessian-vector products of a random projection) against finite differences
    of the jitted gradient -- the same check as ``check_grads(order=2)``'s second level,
    at a fraction of its compile cost. Kernels with a custom VJP have no forward mode of
    their own: ``modes=("rev",)``."""
    if order == 1:
        check_grads(fn, args, order=1, modes=modes)
        return
    out = jax.eval_shape(fn, *args)
    cot = np.random.default_rng(0).normal(size=out.shape)
    loss = lambda *a: jnp.sum(fn(*a) * cot)
    check_grads(jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))), args, 1, modes=("fwd",))


def _modes(impl: str) -> tuple[str, ...]:
    """Autodiff modes of an implementation: the custom-VJP kernels are reverse-only."""
    return ("fwd", "rev") if impl == "xla" else ("rev",)


@pytest.mark.parametrize("impl", LOCAL_F64_IMPLS)
@pytest.mark.parametrize("order", [1, 2])
def test_local_gradients_match_finite_differences(order: int, impl: str) -> None:
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        # 5 rows with kh=3: two tiles with a halo; 4 columns with kw=5: one tile.
        q, k, v = (x.astype(np.float64) for x in _qkv(rng, (1, 5, 4, 2), 3))
        scale = np.array([2.0, 7.0])
        bias = rng.normal(size=(2, 3, 5))
        # (No zero vectors here: |x| is not differentiable at 0, and within eps of 0
        # the normalisation is linear, far narrower than a finite-difference step.)
        f = jax.jit(partial(local_cosine_attention_2d, window=(3, 5), implementation=impl))
        fn = lambda q, k, v, s, b: f(q, k, v, logit_scale=s, bias=b)
        assert fn(q, k, v, scale, bias).dtype == jnp.float64
        _check_grads_of_order(fn, (q, k, v, scale, bias), order, _modes(impl))


@pytest.mark.parametrize("impl", GLOBAL_IMPLS)
@pytest.mark.parametrize("order", [1, 2])
def test_global_gradients_match_finite_differences(order: int, impl: str) -> None:
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        q = rng.normal(size=(2, 4, 2, 3))
        k = rng.normal(size=(2, 5, 2, 3))
        v = rng.normal(size=(2, 5, 2, 2))
        scale = np.array([1.5, 6.0])
        bias = rng.normal(size=(2, 1, 4, 5))
        mask = rng.random((2, 2, 4, 5)) < 0.7
        mask[1, 0, 3] = False  # an all-masked row
        f = jax.jit(partial(cosine_attention, implementation=impl))
        fn = lambda q, k, v, s, b: f(q, k, v, logit_scale=s, bias=b, mask=mask)
        _check_grads_of_order(fn, (q, k, v, scale, bias), order, _modes(impl))
        if order == 1:  # A scalar scale too.
            fs = lambda s: f(q, k, v, logit_scale=s, bias=bias, mask=mask)
            check_grads(fs, (np.float64(3.0),), order=1, modes=("rev",))


# --------------------------------------------------------------------------- #
# Edge cases: zero vectors, all-masked rows, corners -> finite values and grads.  #
# --------------------------------------------------------------------------- #


def _all_grads(
    fn: Callable[..., jax.Array], args: tuple, seed: int = 0
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Output and the gradients of a random projection of it w.r.t. every argument."""
    shape = jax.eval_shape(fn, *args)
    cot = jnp.asarray(np.random.default_rng(seed).normal(size=shape.shape), shape.dtype)

    @jax.jit
    def run(cot: jax.Array, *args: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot)

    return run(cot, *args)


@pytest.mark.parametrize(
    ("height", "width", "window"),
    [(4, 5, (3, 3)), (2, 3, (7, 7)), (9, 9, (7, 7)), (1, 1, (5, 5))],  # tiles, one tile, padded
)
@pytest.mark.parametrize("impl", LOCAL_IMPLS)
def test_local_zero_vectors_and_corners_are_finite(
    height: int, width: int, window: tuple[int, int], impl: str
) -> None:
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, (2, height, width, 2), 4)
    q[0, 0, 0] = 0.0  # corner queries
    k[0, -1, -1] = 0.0  # corner keys
    k[0, : height // 2 + 1] = 0.0  # zero keys in the top half
    q[1], k[1], v[1] = 0.0, 0.0, 0.0  # an all-zero image
    scale, bias = np.array([3.0, 50.0], np.float32), _normal(rng, (2,) + window)
    fn = jax.jit(partial(local_cosine_attention_2d, window=window, implementation=impl))
    call = lambda q, k, v, s, b: fn(q, k, v, logit_scale=s, bias=b)
    out, grads = _all_grads(call, (q, k, v, scale, bias))
    assert _is_finite_tree(out) and _is_finite_tree(grads)
    assert np.all(np.asarray(out)[1] == 0.0)
    ref = local_cosine_attention_2d_ref(q, k, v, window=window, logit_scale=scale, bias=bias)
    np.testing.assert_allclose(out, ref, **F32_TOL)


@pytest.mark.parametrize("impl", GLOBAL_IMPLS)
def test_global_zero_vectors_and_masked_rows_are_finite(impl: str) -> None:
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, (3, 5, 2), 4)
    q[0, 1] = 0.0
    k[1, 2:] = 0.0
    q[2], k[2], v[2] = 0.0, 0.0, 0.0  # all zero
    mask = np.ones((3, 2, 5, 5), bool)
    mask[0, :, 3] = False  # all-masked rows (every head)
    mask[1] = False  # a whole batch element masked
    bias = _normal(rng, (2, 5, 5))
    fn = jax.jit(partial(cosine_attention, mask=mask, implementation=impl))
    call = lambda q, k, v, s, b: fn(q, k, v, logit_scale=s, bias=b)
    out, (gq, gk, gv, gs, gb) = _all_grads(call, (q, k, v, np.float32(10.0), bias))
    assert _is_finite_tree((out, gq, gk, gv, gs, gb))
    out = np.asarray(out)
    assert np.all(out[0, 3] == 0.0) and np.all(out[1] == 0.0) and np.all(out[2] == 0.0)
    # Masked rows do not influence anything: their queries get zero gradient.
    assert np.all(np.asarray(gq)[0, 3] == 0.0) and np.all(np.asarray(gq)[1] == 0.0)
    ref = cosine_attention_ref(q, k, v, logit_scale=10.0, bias=bias, mask=mask)
    np.testing.assert_allclose(out, ref, **F32_TOL)


# --------------------------------------------------------------------------- #
# bfloat16.                                                                    #
# --------------------------------------------------------------------------- #


def _bf16_ops_besides_casts(jaxpr: Any) -> list[str]:
    """Primitives in a printed jaxpr that produce bf16 values, other than casts/layout
    (the 'chunked' kernel reshapes the bf16 inputs into batch chunks and casts each chunk:
    no arithmetic)."""
    allowed = {"convert_element_type", "pjit", "jit", "custom_jvp_call", "custom_vjp_call",
               "reshape", "transpose", "pad", "squeeze", "slice"}
    bad = []
    for line in str(jaxpr).splitlines():
        m = re.match(r"\s*(?:[a-z_]+:bf16\[[\d,]*\]\s*)+=\s*([a-z_]+)", line)
        if m and m.group(1) not in allowed:
            bad.append(line.strip())
    return bad


def test_local_bfloat16() -> None:
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, (2, 6, 7, 2), 8)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    scale, bias, window = np.array([4.0, 20.0], np.float32), _normal(rng, (2, 5, 3)), (5, 3)
    out, w = _local(qb, kb, vb, scale, bias, window=window, return_weights=True)
    assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    # Same inputs, upcast: only the final rounding of the output differs.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (qb, kb, vb))
    out32, w32 = _local(q32, k32, v32, scale, bias, window=window, return_weights=True)
    np.testing.assert_allclose(w, w32, atol=1e-6)  # logits and softmax ran in float32
    np.testing.assert_allclose(out.astype(np.float32), out32, atol=1e-2, rtol=1e-2)
    # Against the unrounded float32 inputs: within bfloat16 tolerance.
    unrounded, _ = _local(q, k, v, scale, bias, window=window, return_weights=True)
    np.testing.assert_allclose(out.astype(np.float32), unrounded, atol=6e-2, rtol=6e-2)
    for impl in LOCAL_IMPLS:
        out_i = _local(qb, kb, vb, scale, bias, window=window, implementation=impl)
        assert out_i.dtype == jnp.bfloat16
        # Every kernel computes in float32 and rounds once: equal to a bf16 ulp.
        np.testing.assert_allclose(out_i.astype(np.float32), out32, atol=1e-2, rtol=1e-2)
        fn = partial(local_cosine_attention_2d, window=window, logit_scale=scale, bias=bias,
                     implementation=impl)
        assert _bf16_ops_besides_casts(jax.make_jaxpr(fn)(qb, kb, vb)) == [], impl
        _, grads = _all_grads(fn, (qb, kb, vb))
        assert all(g.dtype == jnp.bfloat16 for g in grads) and _is_finite_tree(grads), impl


def test_global_bfloat16() -> None:
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, (2, 9, 3), 8)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    mask = rng.random((9, 9)) < 0.7
    out, w = _global(qb, kb, vb, np.float32(8.0), None, mask, return_weights=True)
    assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    q32, k32, v32 = (x.astype(jnp.float32) for x in (qb, kb, vb))
    out32, w32 = _global(q32, k32, v32, np.float32(8.0), None, mask, return_weights=True)
    np.testing.assert_allclose(w, w32, atol=1e-6)
    np.testing.assert_allclose(out.astype(np.float32), out32, atol=1e-2, rtol=1e-2)
    for impl in GLOBAL_IMPLS:
        out_i = _global(qb, kb, vb, np.float32(8.0), None, mask, implementation=impl)
        assert out_i.dtype == jnp.bfloat16
        np.testing.assert_allclose(out_i.astype(np.float32), out32, atol=1e-2, rtol=1e-2)
        fn = partial(cosine_attention, logit_scale=8.0, mask=mask, implementation=impl)
        assert _bf16_ops_besides_casts(jax.make_jaxpr(fn)(qb, kb, vb)) == [], impl
        _, grads = _all_grads(fn, (qb, kb, vb))
        assert all(g.dtype == jnp.bfloat16 for g in grads) and _is_finite_tree(grads), impl


# --------------------------------------------------------------------------- #
# Transformations: jit, vmap, grad, remat, shard_map.                           #
# --------------------------------------------------------------------------- #

_LOCAL = partial(local_cosine_attention_2d, window=(3, 5))
_GLOBAL = cosine_attention
KINDS_AND_IMPLS = [("local", i) for i in LOCAL_IMPLS] + [("global", i) for i in GLOBAL_IMPLS]


@pytest.mark.parametrize(("kind", "impl"), KINDS_AND_IMPLS)
def test_jit_vmap_grad_remat_compose(kind: str, impl: str) -> None:
    rng = np.random.default_rng(8)
    lead = (3, 2, 5, 6, 2) if kind == "local" else (3, 2, 7, 2)  # extra leading vmap axis
    q, k, v = _qkv(rng, lead, 4)
    if kind == "local":
        scale = np.array([2.0, 9.0], np.float32)  # [heads]
        attn, ref = _LOCAL, partial(local_cosine_attention_2d_ref, window=(3, 5))
    else:
        scale = np.float32(6.0)  # scalar
        attn, ref = _GLOBAL, cosine_attention_ref
    f = lambda q, k, v, s: attn(q, k, v, logit_scale=s, implementation=impl)
    expected = np.stack([ref(q[i], k[i], v[i], logit_scale=scale) for i in range(3)])
    if kind == "global" and impl == "xla":  # eager (op by op) too: costly for the others
        np.testing.assert_allclose(f(q[0], k[0], v[0], scale), expected[0], **F32_TOL)
    vmapped = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, None)))(q, k, v, scale)
    np.testing.assert_allclose(vmapped, expected, **F32_TOL)

    def loss(attn_fn: Callable, q: Any, k: Any, v: Any, s: Any) -> jax.Array:
        out = jax.vmap(attn_fn, in_axes=(0, 0, 0, None))(q, k, v, s)
        return jnp.sum(jnp.sin(out))

    argnums = (0, 1, 2, 3)
    plain = jax.jit(jax.grad(partial(loss, f), argnums))(q, k, v, scale)
    remat = jax.jit(jax.grad(partial(loss, jax.checkpoint(f)), argnums))(q, k, v, scale)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert _is_finite_tree(plain) and float(jnp.abs(plain[3]).sum()) > 0


@pytest.mark.parametrize(("kind", "impl"), KINDS_AND_IMPLS)
def test_shard_map_over_batch(kind: str, impl: str) -> None:
    assert jax.device_count() == 4, "tests/conftest.py forces 4 CPU devices"
    mesh = jax.make_mesh((4,), ("data",))
    spec = jax.P("data")
    rng = np.random.default_rng(9)
    lead = (8, 6, 5, 2) if kind == "local" else (8, 10, 2)
    q, k, v = _qkv(rng, lead, 4)
    scale = np.array([3.0, 12.0], np.float32)
    attn = _LOCAL if kind == "local" else _GLOBAL
    f = lambda q, k, v: attn(q, k, v, logit_scale=scale, implementation=impl)
    # Pallas kernels need check_vma=False (their constants do not vary over the mesh).
    sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                    check_vma=not impl.startswith("pallas")))
    put = lambda x: jax.device_put(x, jax.NamedSharding(mesh, spec))
    out = sharded(put(q), put(k), put(v))
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, jax.jit(f)(q, k, v), atol=1e-6)
    # And the gradient through the sharded function.
    g = jax.jit(jax.grad(lambda q: jnp.sum(sharded(q, put(k), put(v)) ** 2)))(put(q))
    g_ref = jax.jit(jax.grad(lambda q: jnp.sum(f(q, k, v) ** 2)))(q)
    tol = 1e-4 if kind == "local" else 1e-5  # local: float32 sums in another order
    np.testing.assert_allclose(g, g_ref, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- #
# Bad input: ValueError naming the argument and the shapes.                    #
# --------------------------------------------------------------------------- #


def _local_call(**overrides: Any) -> Any:
    args = {
        "query": np.zeros((2, 4, 5, 3, 8), np.float32),
        "key": np.zeros((2, 4, 5, 3, 8), np.float32),
        "value": np.zeros((2, 4, 5, 3, 6), np.float32),
        "window": (3, 3),
        "logit_scale": 10.0,
        "bias": None,
    }
    args.update(overrides)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    return local_cosine_attention_2d(q, k, v, **args)


def _global_call(**overrides: Any) -> Any:
    args = {
        "query": np.zeros((2, 4, 3, 8), np.float32),
        "key": np.zeros((2, 6, 3, 8), np.float32),
        "value": np.zeros((2, 6, 3, 5), np.float32),
        "logit_scale": 10.0,
        "bias": None,
        "mask": None,
    }
    args.update(overrides)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    return cosine_attention(q, k, v, **args)


LOCAL_BAD = [
    ({"query": np.zeros((2, 4, 5, 24))}, r"`query` must have rank 5.*got shape \(2, 4, 5, 24\)"),
    ({"key": np.zeros((4, 5, 3, 8))}, r"`key` must have rank 5.*got shape \(4, 5, 3, 8\)"),
    ({"value": np.zeros((1, 2, 4, 5, 3, 6))}, r"`value` must have rank 5"),
    ({"key": np.zeros((3, 4, 5, 3, 8))}, r"batch.*query=2, key=3, value=2"),
    ({"value": np.zeros((2, 4, 6, 3, 6))}, r"image sizes.*query=\(4, 5\).*value=\(4, 6\)"),
    ({"key": np.zeros((2, 4, 5, 2, 8))}, r"head.*query=3, key=2, value=3"),
    ({"key": np.zeros((2, 4, 5, 3, 7))}, r"head_dim.*query=8, key=7"),
    ({"window": (4, 3)}, r"`window`.*odd.*\(4, 3\)"),
    ({"window": (3, 0)}, r"`window`.*positive.*\(3, 0\)"),
    ({"window": (-3, 3)}, r"`window`.*\(-3, 3\)"),
    ({"window": (3,)}, r"`window` must be a pair"),
    ({"window": 3}, r"`window` must be a pair"),
    ({"window": (3.5, 3)}, r"`window` must be a pair"),
    ({"bias": np.zeros((3, 3))}, r"`bias`.*\(3, 3, 3\).*got \(3, 3\)"),
    ({"bias": np.zeros((3, 5, 5))}, r"`bias`.*\[heads, kh, kw\]=\(3, 3, 3\).*got \(3, 5, 5\)"),
    ({"bias": np.zeros((1, 3, 3))}, r"`bias`.*got \(1, 3, 3\)"),
    ({"logit_scale": 0.0}, r"`logit_scale` must be positive"),
    ({"logit_scale": np.array([1.0, -2.0, 3.0])}, r"`logit_scale` must be positive.*-2"),
    ({"logit_scale": np.float32(np.nan)}, r"`logit_scale` must be positive and finite"),
    ({"logit_scale": np.ones(2)}, r"`logit_scale`.*\[heads\]=\(3,\).*got shape \(2,\)"),
    ({"logit_scale": np.ones((3, 1))}, r"`logit_scale`.*got shape \(3, 1\)"),
    ({"implementation": "flash"},
     r"unknown implementation='flash'.*None \(the best available\), 'xla', 'chunked', "
     r"'pallas', 'pallas_interpret'"),
    ({"implementation": "cudnn"}, r"unknown implementation='cudnn'"),
    ({"implementation": "pallas"}, r"'pallas' cannot serve.*compiles for GPU \(Triton\) and "
                                   r"TPU \(Mosaic\).*'cpu'.*'pallas_interpret'.*'xla', 'chunked'"),
    ({"implementation": "pallas_interpret", "window": (15, 3),
      **{n: np.zeros((1, 8, 5, 3, 8), np.float32) for n in ("query", "key", "value")}},
     r"'pallas_interpret' cannot serve.*windows up to 13x13.*got \(15, 3\)"),
    ({"implementation": "chunked", "return_weights": True},
     r"return_weights=True needs.*only implementation='xla'"),
    # NATTEN's options.
    *(({"dilation": d}, r"`dilation` must be a positive int or a pair \(dy, dx\)")
      for d in (0, -1, (2, 0), 1.5, (2.0, 1), True, (2,), (1, 2, 3), "2", None)),
    ({"border": "zeros"}, r"`border` must be one of \('mask', 'shift'\).*got 'zeros'"),
    ({"border": None}, r"`border` must be one of"),
    ({"border": "shift", "dilation": 2},
     r"border='shift'.*kh\*dy <= height and kw\*dx <= width.*window=\(3, 3\) with "
     r"dilation=\(2, 2\) needs an image of at least 6x6, got 4x5.*border='mask'"),
    ({"border": "shift", "window": (5, 3)}, r"needs an image of at least 5x3, got 4x5"),
    ({"border": "shift", "window": (3, 3), "dilation": (1, 2)},
     r"at least 3x6, got 4x5"),
    ({"border": "shift", "bias": np.zeros((3, 3, 3))},
     r"`bias` must be shaped \[heads, 2kh-1, 2kw-1\].*border='shift'.*=\(3, 5, 5\); "
     r"got \(3, 3, 3\)"),
    ({"dilation": 2, "bias": np.zeros((3, 5, 5))},
     r"`bias` must be shaped \[heads, kh, kw\]=\(3, 3, 3\); got \(3, 5, 5\)"),
    ({"implementation": "pallas_interpret", "dilation": (1, 2)},
     r"'pallas_interpret' cannot serve.*no dilation or border='shift'.*'xla', 'chunked'"),
    ({"implementation": "pallas_interpret", "border": "shift"},
     r"'pallas_interpret' cannot serve.*no dilation or border='shift'"),
]


@pytest.mark.parametrize(("overrides", "match"), LOCAL_BAD, ids=lambda x: str(x)[:40])
def test_local_bad_input(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _local_call(**overrides)


def test_pallas_refuses_float64() -> None:
    with jax.enable_x64(True), pytest.raises(
            ValueError, match=r"'pallas_interpret' cannot serve.*computes in float32.*float64"):
        _local_call(implementation="pallas_interpret",
                    **{n: np.zeros((2, 4, 5, 3, 8), np.float64) for n in ("query", "key")})


GLOBAL_BAD = [
    ({"query": np.zeros((2, 4, 24))}, r"`query` must have rank 4.*got shape \(2, 4, 24\)"),
    ({"value": np.zeros((2, 6, 3, 5, 1))}, r"`value` must have rank 4"),
    ({"value": np.zeros((1, 6, 3, 5))}, r"batch.*query=2, key=2, value=1"),
    ({"key": np.zeros((2, 6, 4, 8))}, r"head.*query=3, key=4, value=3"),
    ({"key": np.zeros((2, 6, 3, 9))}, r"head_dim.*query=8, key=9"),
    ({"value": np.zeros((2, 7, 3, 5))}, r"length.*key=6, value=7"),
    ({"bias": np.zeros((4, 5))}, r"`bias` must broadcast to.*\(2, 3, 4, 6\).*got shape \(4, 5\)"),
    ({"bias": np.zeros((2, 3, 4, 6, 1))}, r"`bias`.*got shape \(2, 3, 4, 6, 1\)"),
    ({"mask": np.ones((3, 6), bool)}, r"`mask` must broadcast to.*\(2, 3, 4, 6\).*got shape"),
    ({"mask": np.ones((2, 2, 4, 6), bool)}, r"`mask`.*got shape \(2, 2, 4, 6\)"),
    ({"mask": np.ones((4, 6), np.float32)}, r"`mask` must be boolean.*float32"),
    ({"logit_scale": -1.0}, r"`logit_scale` must be positive"),
    ({"logit_scale": np.ones(4)}, r"`logit_scale`.*\[heads\]=\(3,\).*got shape \(4,\)"),
    ({"implementation": "flash"}, r"unknown implementation='flash'.*'xla', 'chunked', 'cudnn'"),
    ({"implementation": "chunked", "return_weights": True},
     r"return_weights=True needs.*only implementation='xla'"),
    ({"implementation": "cudnn"},
     r"'cudnn' cannot serve these inputs: it needs an NVIDIA GPU.*'xla', 'chunked'"),
]


@pytest.mark.parametrize(("overrides", "match"), GLOBAL_BAD, ids=lambda x: str(x)[:40])
def test_global_bad_input(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _global_call(**overrides)


def test_good_input_variants_are_accepted() -> None:
    """The shapes the validation must *not* reject."""
    # eval_shape traces without compiling; validation runs at trace time.
    local = lambda **kw: jax.eval_shape(partial(_local_call, **kw))
    glob = lambda **kw: jax.eval_shape(partial(_global_call, **kw))
    assert local(logit_scale=np.ones(3), bias=np.zeros((3, 5, 1)), window=[5, 1]).shape == (
        2, 4, 5, 3, 6)
    local(logit_scale=np.ones(1), window=np.array([3, 3]))
    local(logit_scale=np.float32(100.0), window=(21, 1))  # window larger than the image
    glob(bias=np.zeros((1, 6)), mask=np.ones((3, 1, 6), bool), logit_scale=np.ones(3))
    glob(mask=np.ones((4, 6), np.int32))  # integer 0/1 masks are unambiguous
    # Under jit a traced scale cannot be sign-checked, but its shape still is.
    jax.eval_shape(lambda s: _local_call(logit_scale=s), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="logit_scale"):
        jax.eval_shape(lambda s: _local_call(logit_scale=s), np.ones(2, np.float32))


# --------------------------------------------------------------------------- #
# Memory: read from the compiled program, never from timings.                  #
# --------------------------------------------------------------------------- #

_HLO_ARRAY = re.compile(r"\b(?:pred|[subf]\d+|bf16)\[([\d,]*)\]")


def _largest_array(hlo_text: str) -> int:
    """Element count of the largest array anywhere in an HLO module's text."""
    sizes = [
        int(np.prod([int(s) for s in dims.split(",")])) if dims else 1
        for dims in _HLO_ARRAY.findall(hlo_text)
    ]
    return max(sizes)


@functools.cache
def _compiled_local(
    n: int, window: tuple[int, int], grad: bool, heads: int = 2, d: int = 32,
    impl: str = "xla", batch: int = 1,
) -> Any:
    """Compiled forward (or forward+backward) of local attention on
    ``[batch, n, n, heads, d]``."""
    x = jax.ShapeDtypeStruct((batch, n, n, heads, d), jnp.float32)
    attn = lambda q, k, v: local_cosine_attention_2d(
        q, k, v, window=window, logit_scale=10.0, implementation=impl)
    f = attn
    if grad:
        f = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v))), argnums=(0, 1, 2))
    return jax.jit(f).lower(x, x, x).compile()


@pytest.mark.parametrize("impl", XLA_LOCAL_IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_local_never_builds_quadratic_or_patch_arrays(grad: bool, impl: str) -> None:
    n, window, heads, d = 32, (5, 5), 2, 32
    hw = n * n
    compiled = _compiled_local(n, window, grad, heads, d, impl)
    largest = _largest_array(compiled.as_text())
    global_matrix = heads * hw * hw  # [heads, H*W, H*W]
    patches = heads * hw * window[0] * window[1] * d  # [heads, H*W, kh*kw, head_dim]
    # The largest array is the blocked logits, ~4x kh*kw per pixel and head.
    assert largest <= 8 * heads * hw * window[0] * window[1], largest
    assert largest < patches / 4 and largest < global_matrix / 4, (largest, patches)


@pytest.mark.parametrize("impl", XLA_LOCAL_IMPLS)
def test_local_memory_grows_linearly_in_pixels(impl: str) -> None:
    # Forward and backward in one program (the gradient), as in training.
    temps = {n: _compiled_local(n, (5, 5), True, impl=impl).memory_analysis().temp_size_in_bytes
             for n in (16, 32)}
    # 4x the pixels: linear gives ~4 (tile padding aside), quadratic would give 16.
    assert 2.5 < temps[32] / temps[16] < 6.0, temps


def test_chunked_local_keeps_no_logits_for_the_backward_pass() -> None:
    """Training memory: the custom VJP keeps the output and the log-sum-exp, not the
    logits, so forward+backward plans far less than XLA's autodiff of the same tiles, and
    what it plans beyond the arrays it keeps is one chunk's work, whatever the batch."""
    temp = {(impl, b): _compiled_local(32, (7, 7), True, 4, 16, impl, b).memory_analysis(
    ).temp_size_in_bytes for impl, b in (("xla", 32), ("chunked", 32), ("chunked", 8))}
    logits = 32 * 32 * 32 * 4 * 196 * 4  # [batch, H*W, heads, (8+6)^2] float32 of 'xla'
    kept = 32 * 32 * 32 * 4 * 16 * 4  # one [batch, H, W, heads, head_dim] float32 array
    assert temp["xla", 32] > logits, temp
    assert temp["chunked", 32] < temp["xla", 32] / 3, temp
    # Batch 8 -> 32 adds the kept arrays (queries, keys, values, output and their
    # gradients: ~10 per extra image), not logits.
    assert temp["chunked", 32] - temp["chunked", 8] < 12 * kept * 24 / 32, temp


def test_chunked_global_is_linear_in_tokens() -> None:
    """No [tokens, tokens] array in the chunked global kernel, forward or backward."""
    length, heads = 8192, 2
    x = jax.ShapeDtypeStruct((1, length, heads, 8), jnp.float32)
    attn = lambda q, k, v: cosine_attention(q, k, v, logit_scale=10.0, implementation="chunked")
    loss = lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    quadratic = heads * length * length
    assert _largest_array(compiled.as_text()) <= quadratic / 32
    assert compiled.memory_analysis().temp_size_in_bytes < quadratic * 4 / 16


# --------------------------------------------------------------------------- #
# The kernels against each other with several blocks and chunks.              #
# --------------------------------------------------------------------------- #


def _assert_same_values_and_grads(
    fn: Callable[..., jax.Array], ref_fn: Callable[..., jax.Array], args: tuple
) -> jax.Array:
    """``fn`` and ``ref_fn`` agree on ``args``: outputs, and the gradients of a random
    projection w.r.t. every argument that is not None. Returns ``fn``'s output."""
    out, grads = _all_grads(fn, args, seed=1)
    ref_out, ref_grads = _all_grads(ref_fn, args, seed=1)
    np.testing.assert_allclose(out, ref_out, **F32_TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is not None:
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
    return out


@pytest.mark.parametrize(
    ("image", "window", "tile", "with_bias"),
    [((9, 7), (3, 5), 4, True), ((8, 8), (7, 7), 4, False), ((5, 11), (1, 3), 2, True)],
)
@pytest.mark.parametrize("kernel", ["chunked", "pallas_interpret"])
def test_local_kernels_match_halo_kernel(
    image: tuple[int, int], window: tuple[int, int], tile: int, with_bias: bool, kernel: str
) -> None:
    """A tile other than the default, and for 'chunked' several chunks (batch 3 in chunks
    of 1): values and the gradients of queries, keys, values and the bias equal the 'xla'
    kernel's."""
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, (3, *image, 2), 4, 3)
    bias = _normal(rng, (2, *window)) if with_bias else None
    geometry = local_kernels.Geometry(image, window, tile)
    ref_geometry = local_kernels.Geometry(image, window)
    if kernel == "chunked":
        fn = lambda q, k, v, b: local_kernels.chunked_halo_attention(q, k, v, b, geometry, 1)
    else:
        fn = lambda q, k, v, b: pallas_halo_attention(q, k, v, b, geometry, interpret=True)
    halo = lambda q, k, v, b: local_kernels.halo_attention(q, k, v, b, ref_geometry)
    _assert_same_values_and_grads(fn, halo, (q, k, v, bias))


@pytest.mark.parametrize(
    ("image", "window", "tile", "dilation", "border"),
    [((32, 32), (7, 7), 4, (1, 1), "mask"), ((13, 9), (5, 5), 3, (1, 1), "mask"),
     ((12, 10), (3, 3), 4, (2, 1), "mask"), ((9, 11), (3, 3), 4, (1, 1), "shift"),
     ((5, 5), (7, 7), 4, (1, 1), "mask"), ((9, 7), (7, 7), 2, (1, 1), "mask"),
     ((4, 9), (3, 3), 1, (1, 1), "mask"), ((6, 7), (3, 3), None, (1, 1), "mask"),
     ((10, 10), (5, 5), 2, (1, 1), "mask"), ((4, 9), (3, 3), 4, (1, 1), "mask")],
)
def test_folding_the_halos_back_is_the_transpose_of_cutting_them(
    image: tuple[int, int], window: tuple[int, int], tile: int | None,
    dilation: tuple[int, int], border: str,
) -> None:
    """from_key_halos (the kernels' backward pass) equals JAX's transpose of key_halos:
    halos narrower than, as wide as and wider than the tile (the fallback), several
    tiles or one per axis, dilation, 'shift'."""
    g = local_kernels.Geometry(image, window, tile, dilation, border)
    rng = np.random.default_rng(13)
    x = jax.ShapeDtypeStruct((2 * g.groups, g.ty.sub, g.tx.sub, 3, 5), jnp.float32)
    halos = _normal(rng, jax.eval_shape(g.key_halos, x).shape)
    (want,) = jax.linear_transpose(g.key_halos, x)(halos)
    np.testing.assert_allclose(g.from_key_halos(jnp.asarray(halos)), want, atol=1e-5)


def test_chunked_takes_the_whole_image_as_one_tile_when_it_is_small() -> None:
    """One tile for an image of at most a tile's halo of keys, tiles above; the choice is
    per sub-grid, so dilation can make it."""
    one = lambda image, window, dilation=(1, 1): ops_attention.whole_image_if_small(
        local_kernels.Geometry(image, window, ops_attention.chunked_tile(*window), dilation))
    for image, window in [((6, 6), (3, 3)), ((8, 8), (5, 5)), ((8, 8), (7, 7)),
                          ((9, 11), (7, 7))]:
        g = one(image, window)
        assert (g.ty.n, g.tx.n, g.ty.halo, g.tx.halo) == (1, 1, 0, 0), (image, window)
        assert g.n_k == image[0] * image[1]
    for image, window in [((8, 8), (3, 3)), ((10, 10), (5, 5)), ((13, 13), (7, 7)),
                          ((16, 16), (9, 9))]:
        g = one(image, window)
        assert g.ty.n * g.tx.n > 1 and g.ty.halo > 0, (image, window)
    assert one((12, 12), (3, 3), (2, 2)).ty.n == 1  # four 6x6 sub-grids


@pytest.mark.parametrize(
    ("image", "window", "dilation", "border"),
    [((6, 6), (3, 3), (1, 1), "mask"), ((8, 7), (5, 7), (1, 1), "mask"),
     ((8, 6), (3, 3), (2, 1), "shift")],
)
def test_chunked_one_tile_equals_tiles(
    image: tuple[int, int], window: tuple[int, int], dilation: tuple[int, int], border: str
) -> None:
    """The public 'chunked' (one tile for these small images) and the same kernel on tiles
    of 2, both normalising and scaling inside: the same values and gradients of the raw
    queries (a zero one too), keys, values, per-head scale and bias."""
    rng = np.random.default_rng(21)
    q, k, v = _qkv(rng, (3, *image, 2), 4, 3)
    q[0, 0, 0], k[1, -1, -1] = 0.0, 0.0
    scale = np.array([3.0, 30.0], np.float32)
    bias = _natten_bias(rng, 2, window, border)
    tiled = local_kernels.Geometry(image, window, 2, dilation, border)
    assert tiled.ty.n * tiled.tx.n > 1
    reach = window if border == "mask" else tuple(2 * w - 1 for w in window)
    public = ops_attention.whole_image_if_small(local_kernels.Geometry(
        image, window, ops_attention.chunked_tile(*reach), dilation, border))
    assert public.ty.n == public.tx.n == 1  # what the public call below runs

    def public_call(q, k, v, s, b):
        return local_cosine_attention_2d(q, k, v, window=window, logit_scale=s, bias=b,
                                         dilation=dilation, border=border,
                                         implementation="chunked")

    def on_tiles(q, k, v, s, b):
        return local_kernels.chunked_halo_attention(q, k, v, b, tiled, 1, s)

    _assert_same_values_and_grads(public_call, on_tiles, (q, k, v, scale, bias))


@pytest.mark.parametrize(("platform", "backend", "call"), [
    ("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_pallas_kernels_lower_for_gpu_and_tpu(
    monkeypatch: pytest.MonkeyPatch, platform: str, backend: str, call: str
) -> None:
    """Without an accelerator: both Pallas kernels (forward, and the backward of a vjp
    with the bias) lower for CUDA through Triton and for TPU through Mosaic (one kernel
    call forward, two with the backward), as they must before a device compiles them.
    They always compute in float32 (`local_cosine_attention_2d` casts 16-bit inputs
    first). Mosaic asks the device for its TPU generation: a v5e is pretended."""
    from jax import export

    if platform == "tpu":
        tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
        asks = {"get_device_kind": "TPU v5 lite", "get_num_device_cores": 1}
        if not all(hasattr(tpu_info, name) for name in asks):
            pytest.skip("this JAX's Mosaic asks the device otherwise")
        for name, answer in asks.items():
            monkeypatch.setattr(tpu_info, name, lambda answer=answer: answer)
    b, h, d = 2, 2, 16
    image, window = (13, 11), (7, 7)
    g = local_kernels.Geometry(image, window, ops_attention.chunked_tile(*window))
    x = jax.ShapeDtypeStruct((b, *image, h, d), jnp.float32)
    bias = jax.ShapeDtypeStruct((h, *window), jnp.float32)
    fwd = lambda q, k, v, t: pallas_halo_attention(q, k, v, t, g, interpret=False,
                                                   backend=backend)
    fwd_bwd = lambda q, k, v, t: jax.vjp(fwd, q, k, v, t)[1](jnp.ones(x.shape, jnp.float32))
    for fn, calls in ((fwd, 1), (fwd_bwd, 2)):
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(call)])(x, x, x, bias)
        assert exported.mlir_module().count(f"@{call}(") == calls


@pytest.mark.parametrize(
    ("image", "window", "tile", "dilation", "border"),
    [((9, 7), (3, 5), None, (1, 1), "mask"), ((7, 5), (3, 5), 2, (2, 1), "shift"),
     ((6, 9), (5, 3), 1, (1, 2), "mask"), ((4, 4), (9, 9), None, (1, 1), "mask")],
)
def test_gathered_halos_match_the_slices(
    image: tuple[int, int], window: tuple[int, int], tile: int | None,
    dilation: tuple[int, int], border: str,
) -> None:
    """The 'chunked' kernel's halo gather equals the slicing key_halos bit for bit (tiles
    narrower and wider than the halo, one tile, dilation, 'shift')."""
    g = local_kernels.Geometry(image, window, tile, dilation, border)
    x = _normal(np.random.default_rng(12), (2 * g.groups, g.ty.sub, g.tx.sub, 2, 3))
    np.testing.assert_array_equal(g.key_halos_gathered(x), g.key_halos(x))


@pytest.mark.parametrize(
    ("image", "window", "dilation", "border"),
    [((9, 7), (3, 5), (1, 1), "mask"), ((7, 9), (3, 3), (2, 3), "mask"),
     ((7, 5), (3, 5), (2, 1), "shift")],
)
def test_chunked_normalises_inside_like_outside(
    image: tuple[int, int], window: tuple[int, int], dilation: tuple[int, int], border: str
) -> None:
    """'chunked' unit-normalises and scales chunk by chunk inside its custom VJP: values and
    the gradients of the raw queries, keys, values, per-head scale and bias equal 'xla''s
    (which normalises outside, differentiated by JAX), zero query and key vectors
    included; and in float64 (the undilated case)."""
    rng = np.random.default_rng(17)
    q, k, v = _qkv(rng, (3, *image, 2), 4, 3)
    q[0, 0, 0], k[0, -1, -1], k[1, :2] = 0.0, 0.0, 0.0
    scale = np.array([3.0, 30.0], np.float32)
    bias = _natten_bias(rng, 2, window, border)
    def attend(impl: str) -> Callable[..., jax.Array]:
        return lambda q, k, v, s, b: local_cosine_attention_2d(
            q, k, v, window=window, logit_scale=s, bias=b, dilation=dilation, border=border,
            implementation=impl)

    fns = {impl: attend(impl) for impl in XLA_LOCAL_IMPLS}
    _assert_same_values_and_grads(fns["chunked"], fns["xla"], (q, k, v, scale, bias))
    if dilation != (1, 1):
        return  # float64 once is enough
    with jax.enable_x64(True):
        args = tuple(np.asarray(a, np.float64) for a in (q, k, v, scale, bias))
        out, grads = _all_grads(fns["chunked"], args, seed=1)
        ref_out, ref_grads = _all_grads(fns["xla"], args, seed=1)
        assert out.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
        np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-9, rtol=1e-9)


def test_chunked_scale_and_bias_gradients_under_shard_map() -> None:
    """The per-head scale and the bias are replicated across the shards while their
    cotangents are computed per shard: the custom VJP still gives the unsharded
    gradients (summed over the shards)."""
    mesh = jax.make_mesh((4,), ("data",))
    spec = jax.P("data")
    rng = np.random.default_rng(18)
    q, k, v = _qkv(rng, (8, 6, 5, 2), 4)
    scale, bias = np.array([3.0, 12.0], np.float32), _normal(rng, (2, 3, 5))
    f = lambda q, k, v, s, b: _LOCAL(q, k, v, logit_scale=s, bias=b, implementation="chunked")
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3 + (jax.P(),) * 2,
                            out_specs=spec)
    put = lambda x: jax.device_put(x, jax.NamedSharding(mesh, spec))
    loss = lambda fn, k, v: lambda q, s, b: jnp.sum(fn(q, k, v, s, b) ** 2)
    grads = jax.jit(jax.grad(loss(sharded, put(k), put(v)), argnums=(0, 1, 2)))(
        put(q), scale, bias)
    ref = jax.jit(jax.grad(loss(f, k, v), argnums=(0, 1, 2)))(q, scale, bias)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("q_len", "kv_len", "block_q", "block_k", "bias_shape", "mask_shape"),
    [
        (10, 13, 4, 5, None, None),  # padded blocks on both axes
        (7, 9, 3, 4, (1, 2, 7, 9), (2, 1, 7, 9)),  # shared bias, per-batch mask
        (6, 8, 2, 8, (2, 2, 6, 8), (6, 8)),  # per-batch bias, one key block
    ],
)
def test_blocked_global_kernel_matches_dense_kernel(
    q_len: int, kv_len: int, block_q: int, block_k: int,
    bias_shape: tuple | None, mask_shape: tuple | None,
) -> None:
    """Several query and key blocks, padded tails, masked rows: the online softmax and the
    recomputing backward pass give the dense kernel's values and gradients."""
    rng = np.random.default_rng(12)
    q, k, v = _normal(rng, (2, q_len, 2, 4)), _normal(rng, (2, kv_len, 2, 4)), _normal(
        rng, (2, kv_len, 2, 3))
    bias = None if bias_shape is None else _normal(rng, bias_shape)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.6
        mask[..., 1, :] = False  # a fully masked query row
    blocked = lambda q, k, v, b: global_kernels.blocked_attention(
        q, k, v, b, mask, block_q, block_k)
    dense = lambda q, k, v, b: global_kernels.dense_attention(q, k, v, b, mask)[0]
    out = _assert_same_values_and_grads(blocked, dense, (q, k, v, bias))
    if mask is not None:
        assert np.all(np.asarray(out)[:, 1] == 0.0)


# --------------------------------------------------------------------------- #
# NATTEN's options: dilation= and border='shift'.                              #
# --------------------------------------------------------------------------- #

# (height, width, window, dilation, border, with_bias); batch 2, 2 heads.
NATTEN_CASES = [
    (9, 8, (3, 3), (2, 2), "mask", True),  # uneven sub-grids (9 = 5 + 4)
    (7, 11, (5, 3), (1, 3), "mask", True),  # one axis dilated, 11 = 4 + 4 + 3
    (3, 5, (3, 5), (4, 2), "mask", False),  # dilation beyond the image height
    (5, 7, (3, 5), (1, 1), "shift", True),  # NA: shifted windows, no dilation
    (3, 5, (3, 5), (1, 1), "shift", True),  # window == image: one window for everyone
    (9, 8, (3, 3), (3, 2), "shift", True),  # DiNA: 9 = 3 * 3, 8 = 4 + 4
    (10, 7, (5, 7), (2, 1), "shift", False),  # window == image width
    (7, 13, (3, 3), (2, 4), "shift", True),  # sub-grids of 4, 3 / 4, 3, 3, 3 pixels
    (12, 5, (1, 3), (5, 1), "shift", True),  # a 1-wide window axis, dilated
]


def _natten_bias(rng: np.random.Generator, heads: int, window: tuple[int, int],
                 border: str) -> np.ndarray:
    kh, kw = window
    shape = (heads, kh, kw) if border == "mask" else (heads, 2 * kh - 1, 2 * kw - 1)
    return _normal(rng, shape)


def _natten_fn(impl: str, window: tuple[int, int], dilation: tuple[int, int], border: str,
               return_weights: bool = False) -> Callable[..., Any]:
    return partial(local_cosine_attention_2d, window=window, dilation=dilation, border=border,
                   implementation=impl, return_weights=return_weights)


@pytest.mark.parametrize("case", NATTEN_CASES, ids=str)
def test_local_dilation_and_shift_match_reference(case: tuple) -> None:
    """Values of 'xla' and 'chunked' and the weights of 'xla' equal the loop reference;
    with 'mask' the weights are zero exactly at the dilated neighbours outside the image,
    with 'shift' every pixel has kh*kw neighbours of positive weight."""
    height, width, window, dilation, border, with_bias = case
    rng = np.random.default_rng(_seed(case))
    q, k, v = _qkv(rng, (2, height, width, 2), 4, 3)
    scale = _scale(rng, 2, per_head=False)  # up to 20: no weight underflows to 0
    bias = _natten_bias(rng, 2, window, border) if with_bias else None
    ref_out, ref_w = local_cosine_attention_2d_ref(
        q, k, v, window=window, logit_scale=scale, bias=bias, dilation=dilation,
        border=border, return_weights=True)
    out, w = jax.jit(_natten_fn("xla", window, dilation, border, True))(
        q, k, v, logit_scale=scale, bias=bias)
    np.testing.assert_allclose(out, ref_out, **F32_TOL)
    np.testing.assert_allclose(w, ref_w, **F32_TOL)
    chunked = jax.jit(_natten_fn("chunked", window, dilation, border))(
        q, k, v, logit_scale=scale, bias=bias)
    np.testing.assert_allclose(chunked, ref_out, **F32_TOL)
    w = np.asarray(w)
    np.testing.assert_allclose(w.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    if border == "mask":
        outside = ~window_validity(window, (height, width), dilation)[None, :, :, None]
        outside = np.broadcast_to(outside, w.shape)
        assert np.all(w[outside] == 0.0) and np.all(w[~outside] > 0.0)
    else:
        assert np.all(w > 0.0)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    image=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    radii=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    shift=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_local_dilation_and_shift_random_shapes(
    image: tuple[int, int], radii: tuple[int, int], dilation: tuple[int, int], shift: bool,
    seed: int,
) -> None:
    window = (2 * radii[0] + 1, 2 * radii[1] + 1)
    border = "shift" if shift else "mask"
    if shift:  # shrink the dilation (then the window) until every sub-grid holds a window
        dilation = tuple(max(1, min(d, n // w)) for d, n, w in zip(dilation, image, window,
                                                                   strict=True))
        window = tuple(w if w * d <= n else 2 * ((n // d - 1) // 2) + 1
                       for w, d, n in zip(window, dilation, image, strict=True))
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, (1, *image, 2), 3)
    scale = _scale(rng, 2, per_head=True)
    bias = _natten_bias(rng, 2, window, border)
    ref = local_cosine_attention_2d_ref(q, k, v, window=window, logit_scale=scale, bias=bias,
                                        dilation=dilation, border=border)
    for impl in XLA_LOCAL_IMPLS:
        out = jax.jit(_natten_fn(impl, window, dilation, border))(
            q, k, v, logit_scale=scale, bias=bias)
        np.testing.assert_allclose(out, ref, **F32_TOL, err_msg=f"{impl} {window} {dilation}")


def test_shift_windows_are_nattens() -> None:
    """The reference's clamped windows are NATTEN's: its window-start and bias-start
    rules (``get_window_start``, ``get_pb_start`` of its naive CPU kernels), written out
    here, give the same pixels and bias entries for every pixel of many axes."""
    try:
        from tests.reference import _axis_neighbours
    except ImportError:
        from reference import _axis_neighbours

    def natten_start(i: int, n: int, k: int, d: int) -> int:
        r = k // 2
        if d == 1:
            return max(i - r, 0) + (i + r >= n) * (n - i - r - 1)
        if i - r * d < 0:
            return i % d
        if i + r * d >= n:
            a = n // d * d
            b = n - a
            return n - b + i % d - 2 * r * d if i % d < b else a + i % d - k * d
        return i - r * d

    def natten_bias_start(i: int, n: int, k: int, d: int) -> int:
        r = k // 2
        if d == 1:
            return r + (i < r) * (r - i) + (i + r >= n) * (n - i - 1 - r)
        if i - r * d < 0:
            return k - 1 - i // d
        if i + r * d >= n:
            return (n - i - 1) // d
        return r

    for k in (1, 3, 5, 7):
        for d in (1, 2, 3, 4):
            for n in range(k * d, k * d + 9):
                for i in range(n):
                    got = _axis_neighbours(i, n, k, d, "shift")
                    start, pb = natten_start(i, n, k, d), natten_bias_start(i, n, k, d)
                    assert [p for _, p, _, _ in got] == [start + t * d for t in range(k)]
                    assert [b for _, _, b, _ in got] == [pb + t for t in range(k)]


@pytest.mark.parametrize(
    ("image", "window", "dilation", "border"),
    [((5, 7), (3, 3), (2, 3), "mask"), ((7, 5), (3, 5), (2, 1), "shift")],
)
def test_local_dilation_and_shift_gradients(
    image: tuple[int, int], window: tuple[int, int], dilation: tuple[int, int], border: str
) -> None:
    """Gradients w.r.t. queries, keys, values, scale and bias of 'xla' and 'chunked'
    (batch 3 in chunks of 1 and a tile of 2: several chunks and tiles, uneven sub-grids,
    and with 'shift' a halo of 4 wider than the tile) equal those of the differentiable
    reference."""
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, (3, *image, 2), 4, 3)
    scale = np.array([3.0, 8.0], np.float32)
    bias = _natten_bias(rng, 2, window, border)
    ref = lambda q, k, v, s, b: local_cosine_attention_2d_jnp_ref(
        q, k, v, window=window, logit_scale=s, bias=b, dilation=dilation, border=border)
    geometry = local_kernels.Geometry(image, window, 2, dilation, border)

    def kernel(impl: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, s, b):
            qs = q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, -1, keepdims=True), 1e-12))
            kn = k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, -1, keepdims=True), 1e-12))
            qs = qs * s[:, None]
            if impl == "xla":
                return local_kernels.halo_attention(qs, kn, v, b, geometry)
            return local_kernels.chunked_halo_attention(qs, kn, v, b, geometry, 1)
        return fn

    args = (q, k, v, scale, bias)
    ref_out, ref_grads = _all_grads(ref, args, seed=1)
    for impl in XLA_LOCAL_IMPLS:
        out, grads = _all_grads(kernel(impl), args, seed=1)
        np.testing.assert_allclose(out, ref_out, **F32_TOL, err_msg=impl)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=impl)


def test_local_dilation_and_shift_bfloat16_and_zero_vectors() -> None:
    """bfloat16 inputs: float32 compute, one rounding, bfloat16 finite gradients; zero
    queries, keys and a whole zero image give no NaN and zero output."""
    rng = np.random.default_rng(15)
    window, dilation = (3, 3), (2, 3)
    q, k, v = _qkv(rng, (2, 7, 9, 2), 8)
    q[0, 0, 0], k[0, -1, -1], k[0, :3] = 0.0, 0.0, 0.0
    q[1], k[1], v[1] = 0.0, 0.0, 0.0
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (qb, kb, vb))
    scale = np.array([4.0, 20.0], np.float32)
    for border in ("mask", "shift"):
        bias = _natten_bias(rng, 2, window, border)
        ref = local_cosine_attention_2d_ref(q32, k32, v32, window=window, logit_scale=scale,
                                            bias=bias, dilation=dilation, border=border)
        for impl in XLA_LOCAL_IMPLS:
            fn = partial(_natten_fn(impl, window, dilation, border), logit_scale=scale,
                         bias=bias)
            out, grads = _all_grads(fn, (qb, kb, vb))
            assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
            assert _is_finite_tree((out, grads)), (border, impl)
            assert np.all(np.asarray(out)[1] == 0.0)
            np.testing.assert_allclose(out.astype(np.float32), ref, atol=1e-2, rtol=1e-2)
            assert _bf16_ops_besides_casts(jax.make_jaxpr(fn)(qb, kb, vb)) == [], impl


def test_local_defaults_are_the_plain_window() -> None:
    """dilation=1 / (1, 1) and border='mask' are the plain window, bit for bit."""
    rng = np.random.default_rng(16)
    q, k, v = _qkv(rng, (2, 6, 7, 2), 4)
    bias = _normal(rng, (2, 3, 5))
    for impl, dilation in (("xla", 1), ("chunked", (1, 1))):
        plain = _local(q, k, v, np.float32(5.0), bias, window=(3, 5), implementation=impl)
        out = jax.jit(_natten_fn(impl, (3, 5), dilation, "mask"))(
            q, k, v, logit_scale=np.float32(5.0), bias=bias)
        np.testing.assert_array_equal(out, plain)


def test_window_validity_with_dilation() -> None:
    valid = window_validity((3, 3), (5, 6), dilation=(2, 3))
    assert valid.shape == (5, 6, 3, 3)
    assert valid[2, 3].sum() == 3 * 2  # rows 0, 2, 4; cols 0, 3 (6 is outside)
    assert valid[1, 1, :, 1].tolist() == [False, True, True]  # rows -1, 1, 3
    np.testing.assert_array_equal(window_validity((3, 5), (4, 6), dilation=1),
                                  window_validity((3, 5), (4, 6)))


def test_default_implementation_choice() -> None:
    """None picks the memory-lean kernels here (CPU), and 'xla' when weights are asked."""
    from attnflax.ops import attention

    assert attention._resolve_local(None, False) == "chunked"
    assert attention._resolve_local(None, True) == "xla"
    assert attention._resolve_local(None, False, window=(3, 3), dilation=(2, 2)) == "chunked"
    assert attention._resolve_local(None, False, border="shift") == "chunked"
    small, large = 2**20, 2**30
    assert attention._resolve_global(None, False, jnp.float32, 16, small) == "xla"
    assert attention._resolve_global(None, False, jnp.float32, 16, large) == "chunked"
    assert attention._resolve_global(None, True, jnp.bfloat16, 16, large) == "xla"
    assert "NVIDIA GPU" in attention.cudnn_unsupported(jnp.bfloat16, 64)


# --------------------------------------------------------------------------- #
# Benchmark smoke test.                                                        #
# --------------------------------------------------------------------------- #


def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"  # a folder, as every script's --out
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_attention.py"), "--quick",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout  # the markdown table
    report = json.loads((out / "attention.json").read_text())
    assert {"backend", "device_kind", "jax_version", "cpu_count", "rows"} <= set(report)
    assert report["rows"], "no rows"
    keys = {"op", "image", "window", "batch", "heads", "head_dim", "pass", "ms", "gflops",
            "gflop_per_s", "peak_bytes"}
    for row in report["rows"]:
        assert keys <= set(row), set(row)
        assert row["ms"] > 0 and row["peak_bytes"] > 0
    assert {r["op"] for r in report["rows"]} == {"local", "conv3x3", "global"}
    kernels = {(r["op"], r["implementation"]) for r in report["rows"]}
    assert {("local", "xla"), ("local", "chunked"), ("global", "xla"),
            ("global", "chunked")} <= kernels, kernels
    for row in report["rows"]:
        if row["op"] != "conv3x3":
            assert row["ratio_vs_conv"] > 0 and row["peak_ratio_vs_conv"] > 0
            assert len(row["ms_all"]) == report["config"]["repeats"]


def test_cudnn_route_falls_back_cleanly_when_cudnn_refuses(monkeypatch) -> None:
    """Where cuDNN looks usable but refuses while tracing (here: pretend a GPU on CPU),
    None falls back to the blocked kernel and an explicit 'cudnn' is a ValueError."""
    from attnflax.ops import attention

    monkeypatch.setattr(attention, "cudnn_unsupported", lambda dtype, head_dim: None)
    rng = np.random.default_rng(13)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(rng, (2, 6, 2), 8))
    mask = rng.random((6, 6)) < 0.7
    out = jax.jit(lambda q, k, v: cosine_attention(q, k, v, logit_scale=5.0, mask=mask))(
        q, k, v)
    ref = _global(q, k, v, np.float32(5.0), None, mask, implementation="xla")
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=1e-2)
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve these inputs"):
        jax.jit(lambda q: cosine_attention(q, q, q, logit_scale=5.0,
                                           implementation="cudnn"))(q)
