"""The ``'pallas'`` kernel of local attention: one fused program per (image, tile, head).

Same contract and geometry as :mod:`attnflax.ops.local_attention` (queries already unit
and scaled, unit keys, values; tiles of ``T`` query pixels against their halo of
``(T + 2r)^2`` keys; a static penalty masks keys outside the window or the image). Each
program of the forward kernel loads one query tile and its key/value halo, computes
the logits, adds the penalty and the relative-position bias, takes the softmax and the
weighted sum on chip, and writes the output and the per-query log-sum-exp: the logits
never reach main memory. The backward kernel recomputes them from the log-sum-exp
(flash-attention style) and writes the gradients of the query tile and of the key and
value halos (summed back onto the image outside the kernel) and, with a bias, the
per-program bias gradient (reduced over images and tiles outside).

Written with :mod:`jax.experimental.pallas`: lowered for GPU through Triton (Triton's
compiler parameters select it: a plain ``pallas_call`` goes to Mosaic GPU, which cannot
lower the kernels' transposes) and for TPU through Mosaic (every block's last two
dimensions are whole arrays' dimensions, as Mosaic TPU requires of blocks that are not
(8, 128)-aligned: hence the log-sum-exp as ``[programs, n_q, 1]`` columns). The tests
lower both kernels for CUDA and TPU with :mod:`jax.export` on any machine, and run them
in Pallas's interpreter (``implementation='pallas_interpret'``) for their values; no GPU
or TPU has compiled them yet. Block sizes
are padded to powers of two of at least 16 (what ``tl.dot`` needs): padded keys get the
masking penalty and padded feature columns are zeros, so neither changes the result.

Under ``jax.shard_map`` the kernel needs ``check_vma=False`` (the kernel's constants,
the masking penalty and the bias table, do not vary over the mesh axes; JAX's own
workaround). The halos of keys and values are built by XLA before the kernel (about
``(T+2r)^2 / T^2`` times the keys' size); a kernel that reads overlapping windows of the
image directly is the next step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from attnflax.ops.local_attention import Geometry
from attnflax.ops.recompute import recomputing_vjp

Array = jax.Array

#: Largest window side the kernel takes (its logit block grows as ``(T + 2r)^2``).
MAX_WINDOW = 13


def _block(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


def _pad(x: Array, sizes: tuple[int, ...], value: float = 0.0) -> Array:
    """Pads the trailing axes of ``x`` at their end to ``sizes``."""
    lead = x.ndim - len(sizes)
    widths = [(0, 0)] * lead + [(0, s - n) for s, n in zip(sizes, x.shape[lead:], strict=True)]
    return jnp.pad(x, widths, constant_values=value)


def _f32(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, pen_ref, table_ref, o_ref, lse_ref):
    s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=jnp.float32)
    s = s + pen_ref[...] + table_ref[...]
    top = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - top)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o_ref[...] = jnp.dot(p, v_ref[...], preferred_element_type=jnp.float32) / denom
    lse_ref[...] = top + jnp.log(denom)


def _backward_kernel(q_ref, k_ref, v_ref, pen_ref, table_ref, g_ref, lse_ref, delta_ref,
                     dq_ref, dk_ref, dv_ref, *ds_ref):
    q, k, v, g = q_ref[...], k_ref[...], v_ref[...], g_ref[...]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) + pen_ref[...] + table_ref[...]
    p = jnp.exp(s - lse_ref[...])
    dp = jnp.dot(g, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dq_ref[...] = jnp.dot(ds, k, preferred_element_type=jnp.float32)
    dk_ref[...] = jnp.dot(ds.T, q, preferred_element_type=jnp.float32)
    dv_ref[...] = jnp.dot(p.T, g, preferred_element_type=jnp.float32)
    if ds_ref:
        ds_ref[0][...] = ds


def compiler_params(backend: str) -> pl_triton.CompilerParams | None:
    """The kernels' compiler parameters for ``backend``: Triton's on GPU (JAX lowers a
    ``pallas_call`` without them to Mosaic GPU, which has no lowering of the kernels'
    transposes), the default (Mosaic) elsewhere."""
    return pl_triton.CompilerParams() if backend == "gpu" else None


@functools.lru_cache(maxsize=128)
def _pallas_kernel(geometry_key: tuple, shape: tuple[int, ...], interpret: bool,
                   backend: str):
    """The custom-VJP ``(q, k, v, table) -> out`` for one geometry, input shape
    ``(batch, heads, head_dim, value_dim)`` and backend (``jax.default_backend()``)."""
    g = Geometry(*geometry_key)
    compiler_params_ = None if interpret else compiler_params(backend)
    b, h, d, dv = shape
    tiles = g.ty.n * g.tx.n
    programs = b * tiles * h  # program index: ((image * tiles) + tile) * heads + head
    nq, nk, bd, bdv = _block(g.n_q), _block(g.n_k), _block(d), _block(dv)
    big = np.finfo(np.float32).min / 4
    penalty = g.penalty(np.float32).reshape(tiles, g.n_q, g.n_k)  # numpy: no tracer cached
    penalty = np.pad(penalty, ((0, 0), (0, nq - g.n_q), (0, nk - g.n_k)), constant_values=big)

    def spec(*block):  # one program's block of a [programs, *block] array
        return pl.BlockSpec((None, *block), lambda i: (i,) + (0,) * len(block))

    pen_spec = pl.BlockSpec((None, nq, nk), lambda i: ((i // h) % tiles, 0, 0))
    table_spec = pl.BlockSpec((None, nq, nk), lambda i: (i % h, 0, 0))
    def tiles_of(q, k, v):
        qt = _pad(g.query_tiles(q).reshape(programs, g.n_q, d), (nq, bd))
        kt = _pad(g.key_halos(k).reshape(programs, g.n_k, d), (nk, bd))
        vt = _pad(g.key_halos(v).reshape(programs, g.n_k, dv), (nk, bdv))
        return qt, kt, vt

    def padded_table(table):
        if table is None:
            return jnp.zeros((h, nq, nk), jnp.float32)
        return _pad(table.astype(jnp.float32), (nq, nk))

    def run_forward(q, k, v, table):
        qt, kt, vt = tiles_of(q, k, v)
        o, lse = pl.pallas_call(
            _forward_kernel,
            out_shape=(_f32((programs, nq, bdv)), _f32((programs, nq, 1))),
            grid=(programs,),
            in_specs=[spec(nq, bd), spec(nk, bd), spec(nk, bdv), pen_spec, table_spec],
            out_specs=[spec(nq, bdv), spec(nq, 1)],
            interpret=interpret,
            compiler_params=compiler_params_,
        )(qt, kt, vt, penalty, padded_table(table))
        o = o[:, :g.n_q, :dv].reshape(b, g.ty.n, g.tx.n, h, g.n_q, dv)
        return g.from_query_tiles(o), lse

    def backward(args, o, lse, g_out):
        q, k, v, table = args
        gt = g.query_tiles(g_out).reshape(programs, g.n_q, dv)
        delta = jnp.sum(gt * g.query_tiles(o).reshape(programs, g.n_q, dv), axis=-1,
                        keepdims=True)  # [programs, n_q, 1], like the log-sum-exp
        with_bias = table is not None
        qt, kt, vt = tiles_of(q, k, v)
        outs = [_f32((programs, nq, bd)), _f32((programs, nk, bd)), _f32((programs, nk, bdv))]
        out_specs = [spec(nq, bd), spec(nk, bd), spec(nk, bdv)]
        if with_bias:
            outs.append(_f32((programs, nq, nk)))
            out_specs.append(spec(nq, nk))
        grads = pl.pallas_call(
            _backward_kernel,
            out_shape=tuple(outs),
            grid=(programs,),
            in_specs=[spec(nq, bd), spec(nk, bd), spec(nk, bdv), pen_spec, table_spec,
                      spec(nq, bdv), spec(nq, 1), spec(nq, 1)],
            out_specs=out_specs,
            interpret=interpret,
            compiler_params=compiler_params_,
        )(qt, kt, vt, penalty, padded_table(table), _pad(gt, (nq, bdv)), lse,
          _pad(delta, (nq, 1)))
        dqt, dkt, dvt = grads[:3]
        shape_q = (b, g.ty.n, g.tx.n, h, g.n_q)
        shape_k = (b, g.ty.n, g.tx.n, h, g.n_k)
        dq = g.from_query_tiles(dqt[:, :g.n_q, :d].reshape(*shape_q, d))
        dk = g.from_key_halos(dkt[:, :g.n_k, :d].reshape(*shape_k, d))
        dv_ = g.from_key_halos(dvt[:, :g.n_k, :dv].reshape(*shape_k, dv))
        dtable = None
        if with_bias:  # per-program partials -> [heads, n_q, n_k]
            ds = grads[3].reshape(b * tiles, h, nq, nk)[:, :, :g.n_q, :g.n_k]
            dtable = jnp.sum(ds, axis=0).astype(table.dtype)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv_.astype(v.dtype), dtable

    return recomputing_vjp(run_forward, backward)


def pallas_halo_attention(
    q: Array, k: Array, v: Array, bias: Array | None, geometry: Geometry, interpret: bool,
    backend: str | None = None,
) -> Array:
    """The ``'pallas'`` kernel (``interpret=True``: Pallas's interpreter, any backend).
    Same arguments as :func:`attnflax.ops.local_attention.halo_attention`, for a geometry
    without dilation and with ``border='mask'`` (the penalty is per tile, not per
    sub-grid); ``backend`` is the one to compile for (default ``jax.default_backend()``;
    another one only for cross-platform lowering, e.g. with :mod:`jax.export`)."""
    if geometry.groups != 1 or geometry.border != "mask":
        raise ValueError("the Pallas local kernel has no dilation or border='shift'; use "
                         "the 'xla' or 'chunked' kernel")
    table = None if bias is None else geometry.bias_table(bias)
    shape = (q.shape[0], q.shape[3], q.shape[4], v.shape[4])
    backend = backend or jax.default_backend()
    return _pallas_kernel(geometry.key, shape, bool(interpret), backend)(q, k, v, table)
