"""Cosine-similarity attention as pure JAX functions.

Both functions compute, for every query position ``i`` and head ``h``::

    w_ij = softmax_j( s_h * cos(q_i, k_j) + bias_h(i, j) )      cos(q, k) = q.k / (|q| |k|)
    out_i = sum_j w_ij v_j

where ``s_h`` is a positive per-head logit scale. Cosine logits lie in ``[-s, s]``,
so the scale alone sets how sharp attention is, and the softmax cannot overflow.

Numerics: the normalisation, the logits and the softmax run in float32 for
float32 and narrower inputs (bfloat16, float16), and in float64 for float64
inputs; the weighted sum accumulates in that dtype and the output has the
inputs' dtype. Vectors are normalised as ``x * rsqrt(max(|x|^2, eps^2))``
so a zero query or key gives a zero cosine and a finite gradient (the usual
``x / max(|x|, eps)`` has a NaN gradient at zero). Masked entries get exactly zero
weight, and a row with nothing to attend to returns zeros.

Each function takes ``implementation=`` like :func:`jax.nn.dot_product_attention`:
several kernels compute the same contract (``LOCAL_IMPLEMENTATIONS``,
``GLOBAL_IMPLEMENTATIONS``) and ``None`` picks one for the backend and shape. This
module validates the arguments, normalises and scales (the local 'chunked' kernel does that
itself, chunk by chunk), and dispatches; the kernels live
in :mod:`attnflax.ops.local_attention` and :mod:`attnflax.ops.global_attention`.

No Flax, no configuration and no I/O here: the functions compose with ``jit``,
``vmap``, ``grad``, ``jax.checkpoint`` and ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnflax.ops.global_attention import blocked_attention, cudnn_attention, dense_attention
from attnflax.ops.local_attention import (
    BORDERS,
    Geometry,
    chunked_halo_attention,
    halo_attention,
)
from attnflax.ops.pallas_local import MAX_WINDOW as MAX_PALLAS_WINDOW
from attnflax.ops.pallas_local import pallas_halo_attention

Array = jax.Array
ArrayLike = Any

_NORM_EPS = 1e-6


# --------------------------------------------------------------------------- #
# Validation helpers: every error names the argument, what it got and wanted.  #
# --------------------------------------------------------------------------- #


def _check_rank(name: str, x: ArrayLike, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} with layout {layout}; got shape {np.shape(x)}."
        )


def _check_same(what: str, dims: dict[str, int], layout: str) -> None:
    if len(set(dims.values())) > 1:
        got = ", ".join(f"{n}={d}" for n, d in dims.items())
        raise ValueError(f"{what} must match between {', '.join(dims)} ({layout}); got {got}.")


def is_tracer(x: Any) -> bool:
    """Whether `x` is traced (inside ``jit``, ``grad``, ...), so its value cannot be checked."""
    return isinstance(x, jax.core.Tracer)


def _compute_dtype(*xs: ArrayLike) -> Any:
    """float32, or float64 when an input is float64: never narrower than float32."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _check_logit_scale(logit_scale: ArrayLike, num_heads: int, dtype: Any) -> Array:
    """Returns the scale as ``dtype`` ``[heads]``; checks shape and (when concrete) sign."""
    shape = np.shape(logit_scale)
    if shape not in ((), (1,), (num_heads,)):
        raise ValueError(
            f"`logit_scale` must be a scalar or shaped [heads]=({num_heads},); got shape {shape}."
        )
    if not is_tracer(logit_scale):
        values = np.asarray(logit_scale, dtype=np.float64)
        if not np.all(values > 0) or not np.all(np.isfinite(values)):
            raise ValueError(
                "`logit_scale` must be positive and finite (modules store its log and "
                f"exponentiate it); got {values.tolist()}."
            )
    return jnp.broadcast_to(jnp.asarray(logit_scale, dtype), (num_heads,))


def _check_broadcastable(name: str, x: ArrayLike, target: tuple[int, ...], layout: str) -> None:
    shape = np.shape(x)
    ok = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"`{name}` must broadcast to {layout}={target}; got shape {shape}."
        )


def _normalize(x: ArrayLike, dtype: Any) -> Array:
    """Unit vectors along the last axis, in ``dtype``, with a finite gradient at zero."""
    x = jnp.asarray(x).astype(dtype)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


# --------------------------------------------------------------------------- #
# Implementations: one contract, several kernels; None picks for the backend.  #
# --------------------------------------------------------------------------- #

#: Kernels of :func:`local_cosine_attention_2d` (``'pallas_interpret'``: the Pallas
#: kernel in Pallas's interpreter, on any backend; for tests, slow).
LOCAL_IMPLEMENTATIONS = ("xla", "chunked", "pallas", "pallas_interpret")
#: Kernels of :func:`cosine_attention`.
GLOBAL_IMPLEMENTATIONS = ("xla", "chunked", "cudnn")

# Logits one chunk may hold (bytes; local: a chunk of images, global: of query rows):
# small on CPU so they stay in cache, large on accelerators, where the batch is what keeps
# the device busy.
_CHUNK_BYTES = {"cpu": 4 * 2**20}
_CHUNK_BYTES_ACCELERATOR = 512 * 2**20
# Global attention on CPU: the dense kernel while its logits are this small.
_GLOBAL_DENSE_BYTES = 8 * 2**20


def _choices(names: Sequence[str]) -> str:
    return "None (the best available), " + ", ".join(repr(n) for n in names)


def check_implementation(where: str, implementation: str | None, names: Sequence[str]) -> None:
    """Raises a ValueError naming ``where`` unless ``implementation`` is None or one of
    ``names`` (the layers call it at construction, the functions when called)."""
    if implementation is not None and implementation not in names:
        raise ValueError(
            f"{where}: unknown implementation={implementation!r}; choose one of "
            f"{_choices(names)}."
        )


def _resolve(
    fn: str, implementation: str | None, names: Sequence[str], return_weights: bool
) -> str | None:
    """Checks a requested implementation; returns it, or None to choose automatically."""
    check_implementation(fn, implementation, names)
    if return_weights:
        if implementation not in (None, "xla"):
            raise ValueError(
                f"{fn}: return_weights=True needs the weights in memory, which only "
                f"implementation='xla' (or None) builds; {implementation!r} never "
                "materialises them. Drop return_weights or use implementation='xla'."
            )
        return "xla"
    return implementation


def _resolve_local(
    implementation: str | None, return_weights: bool, dtype: Any = jnp.float32,
    window: Sequence[int] = (3, 3), dilation: Sequence[int] = (1, 1), border: str = "mask",
) -> str:
    fn = "local_cosine_attention_2d"
    impl = _resolve(fn, implementation, LOCAL_IMPLEMENTATIONS, return_weights)
    if impl in ("pallas", "pallas_interpret"):
        why = pallas_unsupported(impl, dtype, window, dilation, border)
        if why is not None:
            others = [n for n in LOCAL_IMPLEMENTATIONS if not n.startswith("pallas")]
            raise ValueError(
                f"{fn}: implementation={impl!r} cannot serve these inputs: {why}. Use one of "
                f"{_choices(others)}."
            )
    # 'pallas' is opt-in (never measured on an accelerator here, and it has no dilation or
    # border='shift'): None never picks it.
    return impl or "chunked"


def pallas_unsupported(
    implementation: str, dtype: Any, window: Sequence[int],
    dilation: Sequence[int] = (1, 1), border: str = "mask",
) -> str | None:
    """Why the Pallas local kernel cannot serve these inputs here, or None if it can."""
    if tuple(dilation) != (1, 1) or border != "mask":
        return (f"it has no dilation or border='shift' yet (got dilation={tuple(dilation)}, "
                f"border={border!r}); the 'xla' and 'chunked' kernels have both")
    if implementation == "pallas" and jax.default_backend() not in ("gpu", "tpu"):
        return (f"the Pallas kernel compiles for GPU (Triton) and TPU (Mosaic), and the "
                f"backend is {jax.default_backend()!r}; 'pallas_interpret' runs it in "
                "Pallas's interpreter on any backend (slow: for tests)")
    if jnp.dtype(dtype) == jnp.float64:
        return "it computes in float32 (bfloat16/float16/float32 inputs), not float64"
    if max(window) > MAX_PALLAS_WINDOW:
        return (f"its logit block grows with the window; windows up to "
                f"{MAX_PALLAS_WINDOW}x{MAX_PALLAS_WINDOW} (once clipped to the image), got "
                f"{tuple(window)}")
    return None


def local_chunk_size(batch: int, geometry: Geometry, heads: int, itemsize: int) -> int:
    """Images per chunk of the ``'chunked'`` local kernel: the largest divisor of
    ``batch`` whose blocked logits fit the backend's chunk budget (at least 1)."""
    g = geometry
    per_image = g.groups * g.ty.n * g.tx.n * g.n_q * g.n_k * heads * itemsize
    budget = _CHUNK_BYTES.get(jax.default_backend(), _CHUNK_BYTES_ACCELERATOR)
    target = max(1, budget // max(per_image, 1))
    return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


def chunked_tile(kh: int, kw: int) -> int:
    """Query tile of the ``'chunked'`` local kernel: ``r + 1`` for window radius ``r``
    (at least 4), about half the wasted logits of the ``'xla'`` kernel's ``2r + 2``
    (measured faster on CPU: ``experiments/bench_attention.py``)."""
    return max(max(kh, kw) // 2 + 1, 4)


def whole_image_if_small(geometry: Geometry) -> Geometry:
    """The ``'chunked'`` kernel's tiling: ``geometry``, or one tile covering the whole
    (sub-grid) image when that has no more pixels than one tile's halo has keys. The
    dense dots over the image then cost less than the tiles on CPU, and there are no
    halos to cut out or to sum back (program compiled in about half the time). Measured
    at batch 128, forward+backward, one tile over tiles: 6x6 with a 3x3 window 0.43x,
    8x8 with 5x5 0.58x and 7x7 0.45x; not taken where it loses: 8x8 with 3x3 1.0x (the
    forward 1.3x), 10x10 with 3x3 2.1x and 5x5 1.6x, 13x13 with 7x7 (batch 32) 1.4x."""
    g = geometry
    if g.ty.sub * g.tx.sub > g.n_k or g.ty.n * g.tx.n == 1:
        return g
    return Geometry((g.height, g.width), g.window, max(g.ty.sub, g.tx.sub), g.dilation,
                    g.border)


def global_block_sizes(
    batch: int, heads: int, q_len: int, kv_len: int, itemsize: int
) -> tuple[int, int]:
    """Query and key block sizes of the ``'chunked'`` global kernel: key blocks of up to
    1024, and query blocks (a power of two from 16 to 512) whose logits for the whole
    batch fit the backend's chunk budget."""
    block_k = min(kv_len, 1024)
    budget = _CHUNK_BYTES.get(jax.default_backend(), _CHUNK_BYTES_ACCELERATOR)
    rows = budget // max(batch * heads * block_k * itemsize, 1)
    block_q = 16
    while block_q * 2 <= min(rows, 512):
        block_q *= 2
    return min(q_len, block_q), block_k


def cudnn_unsupported(dtype: Any, head_dim: int) -> str | None:
    """Why the ``'cudnn'`` kernel cannot serve these inputs here, or None if it can."""
    if jax.default_backend() != "gpu":
        return f"it needs an NVIDIA GPU and the backend is {jax.default_backend()!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN's fused attention takes float16/bfloat16 inputs, not {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN needs head_dim a multiple of 8 and at most 128; got {head_dim}"
    return None


def _resolve_global(
    implementation: str | None, return_weights: bool, dtype: Any, head_dim: int,
    logits_bytes: int,
) -> str:
    fn = "cosine_attention"
    impl = _resolve(fn, implementation, GLOBAL_IMPLEMENTATIONS, return_weights)
    why = cudnn_unsupported(dtype, head_dim)
    if impl == "cudnn" and why is not None:
        others = [n for n in GLOBAL_IMPLEMENTATIONS if n != "cudnn"]
        raise ValueError(
            f"{fn}: implementation='cudnn' cannot serve these inputs: {why}. Use one of "
            f"{_choices(others)}."
        )
    if impl is not None:
        return impl
    if why is None:
        return "cudnn"
    if jax.default_backend() == "cpu" and logits_bytes <= _GLOBAL_DENSE_BYTES:
        return "xla"
    return "chunked"


# --------------------------------------------------------------------------- #
# Global attention.                                                           #
# --------------------------------------------------------------------------- #


def cosine_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    logit_scale: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Multi-head cosine-similarity attention over whole sequences.

    ``w[b,h,i,j] = softmax_j(logit_scale[h] * cos(query[b,i,h], key[b,j,h]) + bias[b,h,i,j])``
    over the ``j`` allowed by ``mask``; ``out[b,i,h] = sum_j w[b,h,i,j] value[b,j,h]``.
    The layout is the one of :func:`jax.nn.dot_product_attention`.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, heads, head_dim]``.
      value: ``[batch, kv_len, heads, value_dim]``.
      logit_scale: positive scale, a scalar or ``[heads]``.
      bias: optional additive logit bias broadcastable to ``[batch, heads, q_len, kv_len]``.
      mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``;
        True = may attend. A query with nothing to attend to returns zeros.
      return_weights: also return the attention weights (computed by ``'xla'``).
      implementation: which kernel computes it; all give the same result to float
        rounding (see :mod:`attnflax.ops.global_attention`):

        - ``'xla'``: dense ``[batch, heads, q_len, kv_len]`` logits.
        - ``'chunked'``: query and key blocks with an online softmax and a backward pass
          that recomputes the logits: memory O(tokens x block) without bias and mask.
        - ``'cudnn'``: :func:`jax.nn.dot_product_attention`'s cuDNN fused kernel (NVIDIA
          GPU, float16/bfloat16 inputs, ``head_dim`` a multiple of 8 up to 128; the
          scaled unit queries are rounded to the input dtype).
        - ``None`` (default): ``'cudnn'`` where it can serve the inputs, else ``'xla'``
          on CPU while the logits take at most 8 MiB, else ``'chunked'``;
          ``'xla'`` when ``return_weights``.

    Returns:
      ``out`` ``[batch, q_len, heads, value_dim]`` in the inputs' dtype, and with
      ``return_weights`` the weights ``[batch, heads, q_len, kv_len]`` in float32
      (float64 for float64 inputs).

    Raises:
      ValueError: on wrong ranks, mismatched dimensions, a bias or mask that does
        not broadcast, a non-positive ``logit_scale`` (checked when concrete), or an
        unknown ``implementation`` or one that cannot serve the arguments.
    """
    layout = "[batch, length, heads, head_dim]"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, 4, layout)
    (b, lq, h, d), (bk, lk, hk, dk), (bv, lv, hv, _) = map(np.shape, (query, key, value))
    _check_same("batch sizes", {"query": b, "key": bk, "value": bv}, layout)
    _check_same("head counts", {"query": h, "key": hk, "value": hv}, layout)
    _check_same("head_dim", {"query": d, "key": dk}, layout)
    _check_same("lengths", {"key": lk, "value": lv}, layout)
    out_dtype = jnp.result_type(query, key, value)
    dtype = _compute_dtype(out_dtype)
    scale = _check_logit_scale(logit_scale, h, dtype)
    target = (b, h, lq, lk)
    weights_layout = "[batch, heads, q_len, kv_len]"
    if bias is not None:
        _check_broadcastable("bias", bias, target, weights_layout)
    if mask is not None:
        _check_broadcastable("mask", mask, target, weights_layout)
        mask_dtype = jnp.result_type(mask)
        if not (mask_dtype == jnp.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
            raise ValueError(
                f"`mask` must be boolean (True = may attend), shaped like {weights_layout}; "
                f"got dtype {mask_dtype}. Pass an additive float mask as `bias` instead."
            )
        mask = jnp.asarray(mask, dtype=bool)

    logits_bytes = b * h * lq * lk * jnp.dtype(dtype).itemsize
    impl = _resolve_global(implementation, return_weights, out_dtype, d, logits_bytes)
    q = _normalize(query, dtype) * scale[:, None]  # scaled unit queries: dot = s * cos
    k = _normalize(key, dtype)
    v = jnp.asarray(value).astype(dtype)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    if impl == "xla":
        out, weights = dense_attention(q, k, v, bias, mask)
        return (out.astype(out_dtype), weights) if return_weights else out.astype(out_dtype)
    if impl == "cudnn":
        try:
            return cudnn_attention(q, k, v, bias, mask, jnp.dtype(out_dtype)).astype(out_dtype)
        except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:  # tracing
            if implementation == "cudnn":
                raise ValueError(
                    f"cosine_attention: implementation='cudnn' cannot serve these inputs "
                    f"({e}). Use one of {_choices(('xla', 'chunked'))}."
                ) from e
            # None: cuDNN refused a shape or bias/mask layout; the blocked kernel serves all.
    block_q, block_k = global_block_sizes(b, h, lq, lk, jnp.dtype(dtype).itemsize)
    return blocked_attention(q, k, v, bias, mask, block_q, block_k).astype(out_dtype)


# --------------------------------------------------------------------------- #
# Local (neighbourhood) attention over images.                                 #
# --------------------------------------------------------------------------- #


def normalize_window(window: int | Sequence[int], *, allow_int: bool = True) -> tuple[int, int]:
    """Returns ``(kh, kw)`` from an int (when `allow_int`) or a pair; both odd and positive.

    The one window check of the package: the ops take pairs only (``allow_int=False``),
    the layers and models also a single int for a square window.

    Raises:
      ValueError: for even, non-positive or malformed windows (bools are not ints).
    """
    is_int = lambda w: isinstance(w, int | np.integer) and not isinstance(w, bool)
    pair = (window, window) if allow_int and is_int(window) else window
    try:
        kh, kw = pair
    except (TypeError, ValueError):
        kh = kw = None
    if not (is_int(kh) and is_int(kw)):
        raise ValueError(
            f"`window` must be {'an int or ' if allow_int else ''}a pair (kh, kw) of odd "
            f"positive ints; got {window!r}."
        ) from None
    kh, kw = int(kh), int(kw)
    if kh <= 0 or kw <= 0 or kh % 2 == 0 or kw % 2 == 0:
        examples = "3, 5 or 7" if allow_int else "(3, 3), (5, 5) or (7, 7)"
        raise ValueError(
            f"`window` sizes must be odd and positive so the query pixel sits at the centre; "
            f"got {(kh, kw)}. Use e.g. {examples}."
        )
    return kh, kw


def normalize_dilation(dilation: int | Sequence[int]) -> tuple[int, int]:
    """Returns ``(dy, dx)`` from a positive int or a pair of positive ints.

    Raises:
      ValueError: for non-int, non-positive or malformed dilations.
    """
    is_int = lambda d: isinstance(d, int | np.integer) and not isinstance(d, bool)
    pair = (dilation, dilation) if is_int(dilation) else dilation
    try:
        dy, dx = pair
    except (TypeError, ValueError):
        dy = dx = None
    if not (is_int(dy) and is_int(dx) and dy >= 1 and dx >= 1):
        raise ValueError(
            "`dilation` must be a positive int or a pair (dy, dx) of positive ints "
            f"(1 = adjacent neighbours); got {dilation!r}."
        )
    return int(dy), int(dx)


def check_border(border: str) -> str:
    """Returns ``border`` if it is ``'mask'`` or ``'shift'``; else a ValueError."""
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(
            f"`border` must be one of {BORDERS} ('mask': out-of-image neighbours get zero "
            "weight; 'shift': NATTEN's window shifted inside the image); "
            f"got {border!r}."
        )
    return border


def local_bias_shape(
    heads: int, window: Sequence[int], border: str = "mask"
) -> tuple[int, int, int]:
    """Shape of the relative-position bias of :func:`local_cosine_attention_2d`:
    ``[heads, kh, kw]`` with ``border='mask'`` (by window offset), ``[heads, 2kh-1, 2kw-1]``
    with ``'shift'`` (by key minus query position, NATTEN's ``rpb``)."""
    kh, kw = window
    return (heads, 2 * kh - 1, 2 * kw - 1) if border == "shift" else (heads, kh, kw)


def window_validity(
    window: Sequence[int], image_size: Sequence[int], dilation: int | Sequence[int] = 1
) -> np.ndarray:
    """Boolean ``[height, width, kh, kw]``: whether neighbour ``(oy, ox)`` of each pixel
    (the pixel ``(y + dy*oy, x + dx*ox)`` for ``dilation=(dy, dx)``) is inside the image;
    entry ``[y, x, oy + kh//2, ox + kw//2]`` (``border='mask'``; with ``'shift'`` every
    neighbour is inside)."""
    kh, kw = window
    height, width = image_size
    dy, dx = normalize_dilation(dilation)
    rows = np.arange(height)[:, None] + dy * (np.arange(kh)[None, :] - kh // 2)
    cols = np.arange(width)[:, None] + dx * (np.arange(kw)[None, :] - kw // 2)
    y_ok = (rows >= 0) & (rows < height)
    x_ok = (cols >= 0) & (cols < width)
    return y_ok[:, None, :, None] & x_ok[None, :, None, :]


def local_cosine_attention_2d(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    window: Sequence[int],
    logit_scale: ArrayLike,
    bias: ArrayLike | None = None,
    dilation: int | Sequence[int] = 1,
    border: str = "mask",
    return_weights: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Multi-head cosine attention of every pixel over its ``kh x kw`` neighbourhood.

    With the defaults (``dilation=1``, ``border='mask'``), for pixel ``p = (y, x)``, head
    ``h`` and offset ``o = (oy, ox)`` with ``|oy| <= kh // 2``, ``|ox| <= kw // 2``::

        w[p, h, o] = softmax_o( logit_scale[h] * cos(query[p, h], key[p + o, h])
                                + bias[h, oy + kh//2, ox + kw//2] )
        out[p, h]  = sum_o w[p, h, o] * value[p + o, h]

    Neighbours outside the image get exactly zero weight (they are masked, not
    zero-padded: a zero key would still get logit 0; SASA-style). A window with
    ``kh >= 2*height - 1`` and ``kw >= 2*width - 1`` covers the whole image from
    every pixel and equals :func:`cosine_attention` over the flattened image.

    **Dilation** ``(dy, dx)`` (DiNAT's dilated neighbourhood): the neighbour at offset
    ``o`` is the pixel ``(y + dy*oy, x + dx*ox)``, every ``d``-th pixel of a window
    spanning ``(k - 1) * d + 1`` pixels; with ``border='mask'`` those outside the image
    get zero weight, and ``bias`` is indexed by ``o`` as above.

    **Border** ``'shift'`` (NATTEN's neighbourhood attention): instead of masking, each
    pixel's window is shifted inward at the borders so that it always attends to exactly
    ``kh * kw`` pixels of the image. Along an axis of ``n`` pixels, window ``k`` and
    dilation ``d``, pixel ``i = g + d*j`` (``g = i mod d``) lies at position ``j`` of the
    sub-grid of pixels ``g, g + d, ...`` of length ``L = ceil((n - g) / d)``; its window
    starts at ``s = clip(j - k//2, 0, L - k)`` and holds the pixels ``g + d*(s + t)``,
    ``t = 0..k-1`` (unshifted, ``s = j - k//2``, away from the borders). The bias is
    NATTEN's relative-position bias ``bias[h, kh - 1 + (s_y + t_y - j_y), kw - 1 + (s_x +
    t_x - j_x)]`` shaped ``[heads, 2kh-1, 2kw-1]``, indexed by the key's position minus the
    query's in units of the dilation (which ranges over ``-(k-1)..k-1`` once shifted).
    Needs ``kh * dy <= height`` and ``kw * dx <= width`` (so every sub-grid holds a whole
    window).

    How it is computed (blocked, HaloNet-style; :mod:`attnflax.ops.local_attention`):
    tiles of ``T x T`` query pixels attend densely to their halo of ``(T + 2r)^2`` key
    pixels with batched matmuls, and one static additive term on the logits holds the
    relative-position bias and masks the keys outside the window or the image. No
    ``[H*W, H*W]`` matrix and no ``[H*W, kh*kw, head_dim]`` patch tensor is built, and
    memory grows linearly with ``batch * H * W``. Dilation runs the same on the
    ``dy * dx`` interleaved sub-grids of each image (space-to-batch); ``'shift'`` widens
    the halo to ``r = k - 1``.

    Args:
      query: ``[batch, height, width, heads, head_dim]``.
      key: ``[batch, height, width, heads, head_dim]``.
      value: ``[batch, height, width, heads, value_dim]``.
      window: ``(kh, kw)``, odd positive sizes.
      logit_scale: positive scale, a scalar or ``[heads]``.
      bias: optional relative-position bias: ``[heads, kh, kw]`` with ``border='mask'``,
        indexed by the window offset of the key (centre = same pixel);
        ``[heads, 2kh-1, 2kw-1]`` with ``border='shift'`` (NATTEN's ``rpb``, centre
        ``[h, kh-1, kw-1]`` = same pixel).
      dilation: ``(dy, dx)`` or one int, positive; 1 = adjacent neighbours.
      border: ``'mask'`` (default; out-of-image neighbours get zero weight) or
        ``'shift'`` (the window shifted inside the image, as NATTEN).
      return_weights: also return the attention weights (computed by ``'xla'``).
      implementation: which kernel computes it; all give the same result to float
        rounding:

        - ``'xla'``: the whole batch at once with tiles of ``T = 2r + 2``; autodiff keeps
          the logits ``[batch, H*W, heads, (T+2r)^2]`` for the backward pass.
        - ``'chunked'``: a few images at a time (so on CPU their logits stay in cache),
          tiles of ``T = r + 1`` (half the wasted logits; one tile for the whole image
          when it is no bigger than a tile's halo), the normalisation and scaling
          done chunk by chunk too, and a custom VJP that keeps only the inputs, the
          output and the per-query log-sum-exp and recomputes the rest in the backward
          pass.
        - ``'pallas'``, ``'pallas_interpret'``: fused Pallas kernels (see the README);
          ``dilation=1`` and ``border='mask'`` only.
        - ``None`` (default): ``'chunked'``, or ``'xla'`` when ``return_weights``.

    Returns:
      ``out`` ``[batch, height, width, heads, value_dim]`` in the inputs' dtype, and
      with ``return_weights`` the weights ``[batch, height, width, heads, kh, kw]`` in
      float32 (float64 for float64 inputs), summing to 1 over the last two axes: with
      ``'mask'`` entry ``[..., oy + kh//2, ox + kw//2]`` is the neighbour at offset
      ``o`` (zero outside the image); with ``'shift'`` entry ``[..., t_y, t_x]`` is the
      ``t``-th pixel of the shifted window (NATTEN's layout).

    Raises:
      ValueError: on wrong ranks, mismatched dimensions, even or non-positive
        window sizes, a bad ``dilation`` or ``border``, a window that does not fit the
        image with ``border='shift'``, a bias not shaped as above, a non-positive
        ``logit_scale`` (checked when concrete), or an unknown ``implementation`` or
        one that cannot serve the arguments.
    """
    layout = "[batch, height, width, heads, head_dim]"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, 5, layout)
    (b, height, width, h, d), ks, vs = map(np.shape, (query, key, value))
    _check_same("batch sizes", {"query": b, "key": ks[0], "value": vs[0]}, layout)
    _check_same("image sizes", {"query": (height, width), "key": ks[1:3], "value": vs[1:3]}, layout)
    _check_same("head counts", {"query": h, "key": ks[3], "value": vs[3]}, layout)
    _check_same("head_dim", {"query": d, "key": ks[4]}, layout)
    kh, kw = normalize_window(window, allow_int=False)
    dy, dx = normalize_dilation(dilation)
    check_border(border)
    if border == "shift" and (kh * dy > height or kw * dx > width):
        raise ValueError(
            f"border='shift' keeps every pixel's window of {kh}x{kw} neighbours inside the "
            f"image, which needs kh*dy <= height and kw*dx <= width (every sub-grid of a "
            f"dilated axis must hold a whole window); window=({kh}, {kw}) with "
            f"dilation=({dy}, {dx}) needs an image of at least {kh * dy}x{kw * dx}, got "
            f"{height}x{width}. Use a smaller window or dilation, or border='mask'."
        )
    out_dtype = jnp.result_type(query, key, value)
    dtype = _compute_dtype(out_dtype)
    scale = _check_logit_scale(logit_scale, h, dtype)
    bias_shape = local_bias_shape(h, (kh, kw), border)
    if bias is not None and np.shape(bias) != bias_shape:
        what = ("[heads, kh, kw]" if border == "mask" else
                "[heads, 2kh-1, 2kw-1] (border='shift': NATTEN's relative-position bias, "
                "by key minus query position)")
        raise ValueError(f"`bias` must be shaped {what}={bias_shape}; got {np.shape(bias)}.")

    # Offsets beyond the image never count: the kernels see the window clipped to it.
    effective = (min(kh, 2 * height - 1), min(kw, 2 * width - 1))
    impl = _resolve_local(implementation, return_weights, out_dtype, effective, (dy, dx), border)
    # 'shift' reaches k - 1 positions from the query: the halo of a (2k - 1) window.
    reach = (kh, kw) if border == "mask" else (2 * kh - 1, 2 * kw - 1)
    tile = None if impl == "xla" else chunked_tile(*reach)
    geometry = Geometry((height, width), (kh, kw), tile, (dy, dx), border)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    if impl == "chunked":  # normalises and scales chunk by chunk, in cache
        geometry = whole_image_if_small(geometry)
        chunk = local_chunk_size(b, geometry, h, jnp.dtype(dtype).itemsize)
        return chunked_halo_attention(query, key, value, bias, geometry, chunk, scale,
                                      _NORM_EPS).astype(out_dtype)
    q = _normalize(query, dtype) * scale[:, None]  # the scale goes on the (small) queries
    k = _normalize(key, dtype)
    v = jnp.asarray(value).astype(dtype)
    if impl == "xla":
        result = halo_attention(q, k, v, bias, geometry, return_weights=return_weights)
        if not return_weights:
            return result.astype(out_dtype)
        return result[0].astype(out_dtype), result[1]
    out = pallas_halo_attention(q, k, v, bias, geometry, interpret=impl == "pallas_interpret")
    return out.astype(out_dtype)
