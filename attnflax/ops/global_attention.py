"""Kernels of global attention: the same contract, three ways.

Every kernel takes queries already unit-normalised and multiplied by the per-head logit
scale, unit keys and values (``[batch, length, heads, dim]``, compute dtype), an optional
additive bias and boolean mask broadcastable to ``[batch, heads, q_len, kv_len]``, and
returns ``sum_j softmax_j(q_i . k_j + bias_ij) v_j`` over the allowed ``j`` (a row with
nothing allowed gives zeros). Cosine attention *is* dot-product attention on these
inputs with ``scale=1``, so the standard kernels apply.

- ``'xla'`` (:func:`dense_attention`): the ``[batch, heads, q_len, kv_len]`` logits in
  one program (the only kernel that can return the weights).
- ``'chunked'`` (:func:`blocked_attention`): query blocks against key blocks with an
  online softmax, and a custom VJP that keeps the output and the per-query
  log-sum-exp and recomputes each block's logits in the backward pass (flash attention,
  Dao et al. 2022). Memory is O(tokens x block) without bias and mask (with them, the
  size of the broadcast bias/mask).
- ``'cudnn'`` (:func:`cudnn_attention`): :func:`jax.nn.dot_product_attention` with
  ``implementation='cudnn'`` (fused flash attention on NVIDIA GPUs, float16/bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnflax.ops.recompute import recomputing_vjp

Array = jax.Array


def _masked_softmax(logits: Array, mask: Array | None, axis: int = -1) -> Array:
    """Softmax where ``mask=False`` entries get exactly zero weight.

    A row whose entries are all masked returns all zeros (and zero gradients).
    """
    if mask is None:
        return jax.nn.softmax(logits, axis=axis)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=axis)
    return jnp.where(mask, weights, 0.0)


def dense_attention(
    q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None
) -> tuple[Array, Array]:
    """The ``'xla'`` kernel. Returns ``out [b, Lq, h, dv]`` and weights ``[b, h, Lq, Lk]``."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        logits = logits + bias
    weights = _masked_softmax(logits, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v), weights


def cudnn_attention(
    q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None, dtype: jnp.dtype
) -> Array:
    """The ``'cudnn'`` kernel: inputs cast to ``dtype`` (float16/bfloat16), fused on GPU.

    Rows with nothing to attend to are zeroed (cuDNN would average the values).
    """
    out = jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype),
        bias=None if bias is None else bias.astype(dtype),
        mask=mask, scale=1.0, implementation="cudnn",
    )
    if mask is not None:
        b, lq, h = q.shape[:3]
        live = jnp.any(jnp.broadcast_to(mask, (b, h, lq, k.shape[1])), axis=-1)  # [b, h, Lq]
        out = jnp.where(live.transpose(0, 2, 1)[..., None], out, 0)
    return out


def _blocks(x: Array, axis: int, block: int, n: int) -> Array:
    """Pads ``axis`` to ``n * block`` and moves the block index to the front:
    ``[..., L, ...] -> [n, ..., block, ...]``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: Array, axis: int, length: int) -> Array:
    """Inverse of :func:`_blocks` for an array whose block axis sits at ``axis + 1``
    after the front block index is moved back."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


@functools.lru_cache(maxsize=256)
def _blocked_kernel(lq: int, lk: int, block_q: int, block_k: int):
    """The custom-VJP ``(q, k, v, bias, mask) -> out`` for fixed lengths and blocks.

    ``bias`` (float) and ``mask`` (bool) are None or shaped ``[bb, h, Lq, Lk]`` with
    ``bb`` 1 or the batch.
    """
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    key_ok = np.arange(nk * block_k).reshape(nk, 1, 1, block_k) < lk  # [nk, 1, 1, bk]

    def split(q, k, v, bias, mask):
        qb = _blocks(q, 1, block_q, nq)  # [nq, b, bq, h, d]
        kb, vb = _blocks(k, 1, block_k, nk), _blocks(v, 1, block_k, nk)  # [nk, b, bk, h, d]

        def pairs(x):  # [bb, h, Lq, Lk] -> [nq, nk, bb, h, bq, bk]
            return None if x is None else jnp.moveaxis(
                _blocks(_blocks(x, 2, block_q, nq), 4, block_k, nk), 0, 1)

        return qb, kb, vb, pairs(bias), pairs(mask)

    def logits(qb, kb, bias_b, mask_b, ok):
        s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb)
        if bias_b is not None:
            s = s + bias_b
        valid = ok if mask_b is None else ok & mask_b
        return s, valid

    def run_forward(q, k, v, bias, mask):
        qb, kb, vb, bias_p, mask_p = split(q, k, v, bias, mask)
        low = jnp.finfo(q.dtype).min

        def q_step(_, xs):
            q_blk, bias_row, mask_row = xs

            def k_step(carry, ys):
                m, denom, acc = carry
                k_blk, v_blk, ok, bias_b, mask_b = ys
                s, valid = logits(q_blk, k_blk, bias_b, mask_b, ok)
                s = jnp.where(valid, s, low)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                denom = denom * corr + jnp.sum(p, axis=-1)
                acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v_blk)
                return (m_new, denom, acc), None

            # Initial carries derived from the inputs (zeros_like), so that under
            # shard_map they vary over the same mesh axes as the loop's outputs.
            zero = jnp.zeros_like(q_blk[..., 0]).transpose(0, 2, 1)  # [b, h, bq]
            acc = jnp.zeros_like(vb[0, :, :1]).transpose(0, 2, 1, 3) + zero[..., None]
            init = (zero + low, zero, acc)
            (m, denom, acc), _ = jax.lax.scan(k_step, init, (kb, vb, key_ok, bias_row, mask_row))
            live = denom > 0
            denom = jnp.where(live, denom, 1.0)
            out = jnp.where(live[..., None], acc / denom[..., None], 0.0)
            lse = m + jnp.log(denom)
            return None, (out.transpose(0, 2, 1, 3), lse)  # [b, bq, h, dv], [b, h, bq]

        _, (out, lse) = jax.lax.scan(q_step, None, (qb, bias_p, mask_p))
        return _unblock(out, 1, lq), lse  # lse stays blocked: [nq, b, h, bq]

    def backward(args, out, lse, g):
        q, k, v, bias, mask = args
        qb, kb, vb, bias_p, mask_p = split(q, k, v, bias, mask)
        gb, ob = _blocks(g, 1, block_q, nq), _blocks(out, 1, block_q, nq)
        bb = None if bias is None else bias.shape[0]

        def q_step(carry, xs):
            dk_all, dv_all = carry
            q_blk, g_blk, o_blk, lse_blk, bias_row, mask_row = xs
            delta = jnp.einsum("bqhd,bqhd->bhq", g_blk, o_blk)

            def k_step(dq, ys):
                k_blk, v_blk, ok, bias_b, mask_b = ys
                s, valid = logits(q_blk, k_blk, bias_b, mask_b, ok)
                p = jnp.where(valid, jnp.exp(s - lse_blk[..., None]), 0.0)
                dp = jnp.einsum("bqhd,bkhd->bhqk", g_blk, v_blk)
                ds = p * (dp - delta[..., None])
                dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk)
                dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk)
                dv = jnp.einsum("bhqk,bqhd->bkhd", p, g_blk)
                dbias = None
                if bb is not None:  # the bias's batch axis: 1 (shared) or the batch
                    dbias = jnp.sum(ds, axis=0, keepdims=True) if bb == 1 else ds
                return dq, (dk, dv, dbias)

            dq, (dk, dv, dbias) = jax.lax.scan(
                k_step, jnp.zeros_like(q_blk), (kb, vb, key_ok, bias_row, mask_row))
            return (dk_all + dk, dv_all + dv), (dq, dbias)

        init = (jnp.zeros_like(kb), jnp.zeros_like(vb))
        (dk, dv), (dq, dbias) = jax.lax.scan(q_step, init, (qb, gb, ob, lse, bias_p, mask_p))
        if dbias is not None:  # [nq, nk, bb, h, bq, bk] -> [bb, h, Lq, Lk]
            dbias = dbias.transpose(2, 3, 0, 4, 1, 5).reshape(
                bb, q.shape[2], nq * block_q, nk * block_k)[:, :, :lq, :lk]
        return _unblock(dq, 1, lq), _unblock(dk, 1, lk), _unblock(dv, 1, lk), dbias, None

    return recomputing_vjp(run_forward, backward)


def blocked_attention(
    q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None,
    block_q: int, block_k: int,
) -> Array:
    """The ``'chunked'`` kernel (flash attention with a recomputing backward pass).

    Args:
      q: scaled unit queries ``[b, Lq, h, d]``.
      k: unit keys ``[b, Lk, h, d]``.
      v: values ``[b, Lk, h, dv]``.
      bias: None or broadcastable to ``[b, h, Lq, Lk]``.
      mask: None or boolean, broadcastable to ``[b, h, Lq, Lk]``.
      block_q: queries per block.
      block_k: keys per block.

    Returns:
      ``[b, Lq, h, dv]``.
    """
    b, lq, h = q.shape[:3]
    lk = k.shape[1]

    def full(x):  # broadcast to [1 or b, h, Lq, Lk]
        if x is None:
            return None
        x = jnp.asarray(x)
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        return jnp.broadcast_to(x, (x.shape[0], h, lq, lk))

    kernel = _blocked_kernel(lq, lk, min(block_q, lq), min(block_k, lk))
    return kernel(q, k, v, full(bias), full(mask))
