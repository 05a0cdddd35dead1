"""Benchmark of the attention kernels (issue 3): local vs 3x3 conv vs global attention.

Times the forward pass and the forward+backward pass of
:func:`attnflax.local_cosine_attention_2d` for several windows and image sizes,
beside a 3x3 convolution of the same width (``lax.conv_general_dilated``, NHWC)
and beside global :func:`attnflax.cosine_attention` over the flattened image.
Runs on whatever backend JAX finds (CPU, GPU, TPU).

Usage::

    python experiments/bench_attention.py                  # the full default sweep
    python experiments/bench_attention.py --quick          # a tiny smoke run
    python experiments/bench_attention.py --sizes 32 --windows 7 --batch 32 --repeats 9

What is timed: each op is ``jax.jit``-compiled, run ``--warmup`` times (not
timed, so compilation is excluded), then ``--repeats`` times with
``block_until_ready``; the table shows the median. Forward+backward is
``jax.vjp`` of the op with a fixed random cotangent (an input of the timed
program, made outside it), returning the output and the gradients with respect
to every input (query, key, value for attention; input and kernel for the conv).

FLOP counts (one multiply-add = 2 flops), the *nominal* work of each op, with
``B`` batch, ``H x W`` image, ``h`` heads of ``d`` dims, width ``C = h * d``::

    local attention, forward : 2 * B*H*W * h * kh*kw * d * 2   (logits q.k + weighted sum w.v)
    global attention, forward: 2 * B * (H*W)^2 * h * d * 2
    3x3 conv, forward        : 2 * B*H*W * 9 * C * C
    forward+backward         : 3x the forward count (two matmuls per matmul backward)

Normalisation, softmax and masking are not counted, nor the extra work of the
blocked local kernel (each ``T x T`` tile of queries attends densely to its
``(T+2r)^2`` halo, about 4x ``kh*kw`` keys per pixel): GFLOP/s is *useful*
work per second. ``ratio_vs_conv`` compares per-example times with the conv of
the same size and pass.

Memory: ``peak_bytes`` is the compiled program's ``memory_analysis()``
argument + output + temp bytes (what XLA plans to allocate), and
``largest_array_bytes`` the largest array in the optimised HLO (fusions
included: on CPU XLA fuses global attention's logits matmul into the softmax and
allocates the logits inside the fused kernel, outside the plan). On GPU the
device's ``peak_bytes_in_use`` (a process-wide high-water mark) is recorded too,
on CPU the process's peak RSS. When a program would exceed ``--max-bytes``
(plan, or arguments + outputs + largest array) the batch is halved until it
fits, and the row says so.

The JSON written to ``--out`` holds the backend, device kind, JAX version, CPU
count, load average, the configuration and one row per (op, size, window, pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnflax import cosine_attention, local_cosine_attention_2d

LOGIT_SCALE = 10.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="square image sizes H = W")
    p.add_argument("--windows", type=int, nargs="+", default=[3, 5, 7],
                   help="odd square local-attention windows k (k x k)")
    p.add_argument("--batch", type=int, default=32, help="batch size (halved to fit --max-bytes)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16, help="width = heads * head_dim")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    p.add_argument("--max-bytes", type=float, default=None,
                   help="per-program memory budget in bytes (default: 2 GiB on CPU, "
                        "half the device memory on an accelerator)")
    p.add_argument("--ops", nargs="+", default=["local", "conv3x3", "global"],
                   choices=["local", "conv3x3", "global"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--growth-from", type=int, default=16,
                   help="image size from which time growth (to the largest size) is summarised")
    p.add_argument("--out", default="runs/bench/attention.json", help="JSON output path")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: size 8, window 3, batch 2, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.windows, args.batch, args.repeats, args.warmup = [8], [3], 2, 1, 1
    return args


# --------------------------------------------------------------------------- #
# The ops and their flop counts.                                              #
# --------------------------------------------------------------------------- #


def local_flops(b: int, n: int, heads: int, d: int, k: int) -> float:
    """Forward flops of local attention: logits + weighted sum over the k x k window."""
    return 2.0 * b * n * n * heads * k * k * d * 2


def global_flops(b: int, n: int, heads: int, d: int) -> float:
    """Forward flops of global attention over the n*n flattened pixels."""
    return 2.0 * b * (n * n) ** 2 * heads * d * 2


def conv_flops(b: int, n: int, width: int) -> float:
    """Forward flops of a 3x3, stride 1, SAME conv from ``width`` to ``width`` channels."""
    return 2.0 * b * n * n * 9 * width * width


def random_normal(
    rng: np.random.Generator, shape: Sequence[int], dtype: Any, scale: float = 1.0
) -> jax.Array:
    """Standard normal device array (drawn with numpy: no RNG program to compile)."""
    x = rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(scale)
    return jnp.asarray(x, dtype)


def make_op(
    op: str, b: int, n: int, heads: int, d: int, window: int, dtype: Any
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """The op as a function of its array inputs, and random inputs for it."""
    rng = np.random.default_rng(0)
    width = heads * d
    if op == "conv3x3":
        x = random_normal(rng, (b, n, n, width), dtype)
        kernel = random_normal(rng, (3, 3, width, width), dtype, scale=1 / np.sqrt(9 * width))

        def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
            return jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )

        return conv, (x, kernel)
    if op == "local":
        shape = (b, n, n, heads, d)
        fn = lambda q, k, v: local_cosine_attention_2d(
            q, k, v, window=(window, window), logit_scale=LOGIT_SCALE
        )
    else:
        shape = (b, n * n, heads, d)
        fn = lambda q, k, v: cosine_attention(q, k, v, logit_scale=LOGIT_SCALE)
    return fn, tuple(random_normal(rng, shape, dtype) for _ in range(3))


def forward_backward(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    """``(cotangent, *inputs) -> (out, grads w.r.t. every input)``."""

    def run(cot: jax.Array, *inputs: jax.Array) -> Any:
        out, vjp = jax.vjp(fn, *inputs)
        return out, vjp(cot)

    return run


# --------------------------------------------------------------------------- #
# Measurement.                                                                #
# --------------------------------------------------------------------------- #


def compile_fitting(
    op: str, pass_: str, batch: int, n: int, heads: int, d: int, window: int, dtype: Any,
    max_bytes: float,
) -> tuple[Any, tuple[jax.Array, ...], int, dict[str, int]]:
    """Compiles the op, halving the batch until its planned memory fits ``max_bytes``."""
    while True:
        fn, inputs = make_op(op, batch, n, heads, d, window, dtype)
        if pass_ == "fwd":
            f = fn
        else:  # A fixed random cotangent, made outside the timed program.
            out = jax.eval_shape(fn, *inputs)
            cot = random_normal(np.random.default_rng(1), out.shape, out.dtype)
            f, inputs = forward_backward(fn), (cot, *inputs)
        compiled = jax.jit(f).lower(*inputs).compile()
        mem = memory_of(compiled)
        if mem["budget_bytes"] <= max_bytes or batch == 1:
            return compiled, inputs, batch, mem
        batch = max(1, batch // 2)


_HLO_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+)\[([\d,]*)\]")


def largest_array_bytes(hlo_text: str) -> int:
    """Bytes of the largest array named anywhere in an HLO module, fusions included."""
    largest = 0
    for dtype, dims in _HLO_ARRAY.findall(hlo_text):
        bits = 8 if dtype == "pred" else 16 if dtype == "bf16" else int(dtype[1:])
        count = int(np.prod([int(x) for x in dims.split(",")])) if dims else 1
        largest = max(largest, count * bits // 8)
    return largest


def memory_of(compiled: Any) -> dict[str, int]:
    """Memory of a compiled program (0 where the backend does not report it).

    ``peak_bytes`` is XLA's plan: argument + output + temp bytes. On CPU, XLA fuses a
    dot with its consumers and the intermediate it then allocates inside the fused
    kernel is not in the plan (global attention's logits), so ``largest_array_bytes``
    (from the optimised HLO) is recorded too, and the batch is fitted to
    ``budget_bytes`` = max(plan, arguments + outputs + largest array).
    """
    try:
        m = compiled.memory_analysis()
        arg, out, temp = (int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
                          for k in ("argument", "output", "temp"))
    except Exception:  # noqa: BLE001 - some backends do not implement it
        arg = out = temp = 0
    try:
        largest = largest_array_bytes(compiled.as_text())
    except Exception:  # noqa: BLE001
        largest = 0
    return {"peak_bytes": arg + out + temp, "temp_bytes": temp, "argument_bytes": arg,
            "output_bytes": out, "largest_array_bytes": largest,
            "budget_bytes": max(arg + out + temp, arg + out + largest)}


def time_ms(
    compiled: Any, inputs: Sequence[jax.Array], warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU milliseconds of ``repeats`` runs after ``warmup`` untimed
    runs. CPU time (all threads of this process) is steadier than wall time on a shared
    host; on an idle host wall time is the one that matters."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*inputs))
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*inputs))
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def device_peak_bytes() -> int | None:
    """The device's process-wide peak memory in use, where the backend reports it."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return None
    return stats.get("peak_bytes_in_use")


def process_peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return kib * (1 if sys.platform == "darwin" else 1024)


def default_max_bytes() -> float:
    """2 GiB on CPU; half the device memory on an accelerator."""
    if jax.default_backend() != "cpu":
        try:
            limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
            if limit:
                return limit / 2
        except Exception:  # noqa: BLE001
            pass
    return 2.0 * 2**30


def bench_row(
    op: str, pass_: str, n: int, window: int, args: argparse.Namespace, max_bytes: float
) -> dict[str, Any]:
    """Compiles, times and describes one (op, image size, window, pass)."""
    dtype = jnp.dtype(args.dtype)
    heads, d = args.heads, args.head_dim
    compiled, inputs, batch, mem = compile_fitting(
        op, pass_, args.batch, n, heads, d, window, dtype, max_bytes
    )
    times, cpu_times = time_ms(compiled, inputs, args.warmup, args.repeats)
    if op == "local":
        flops = local_flops(batch, n, heads, d, window)
    elif op == "global":
        flops = global_flops(batch, n, heads, d)
    else:
        flops = conv_flops(batch, n, heads * d)
    flops *= 1 if pass_ == "fwd" else 3
    ms = statistics.median(times)
    note = ""
    if batch != args.batch:
        note = f"batch reduced {args.batch}->{batch} to fit {max_bytes / 2**30:.1f} GiB"
    return {
        "op": op, "pass": pass_, "image": n, "window": window if op == "local" else None,
        "batch": batch, "heads": heads, "head_dim": d, "width": heads * d,
        "dtype": args.dtype, "ms": ms, "ms_min": min(times), "ms_all": times,
        "ms_per_example": ms / batch, "cpu_ms": statistics.median(cpu_times),
        "cpu_ms_all": cpu_times, "gflops": flops / 1e9,
        "gflop_per_s": flops / 1e9 / (ms / 1e3), **mem,
        "device_peak_bytes": device_peak_bytes(),
        "process_peak_rss_bytes": process_peak_rss_bytes(), "note": note,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_vs_conv`` (wall) and ``cpu_ratio_vs_conv`` (process CPU time): per-example
    time over the 3x3 conv's at the same image size and pass."""
    convs = {(r["image"], r["pass"]): r for r in rows if r["op"] == "conv3x3"}
    for r in rows:
        base = convs.get((r["image"], r["pass"]))
        if base is None or r["op"] == "conv3x3":
            r["ratio_vs_conv"] = r["cpu_ratio_vs_conv"] = None
            continue
        r["ratio_vs_conv"] = r["ms_per_example"] / base["ms_per_example"]
        r["cpu_ratio_vs_conv"] = (r["cpu_ms"] / r["batch"]) / (base["cpu_ms"] / base["batch"])


def summarise(rows: list[dict[str, Any]], growth_from: int) -> dict[str, Any]:
    """Growth of local-attention time with pixels, per window and pass (per example), from
    size ``growth_from`` (or the smallest size) to the largest."""
    local = {(r["image"], r["window"], r["pass"]): r["ms_per_example"]
             for r in rows if r["op"] == "local"}
    local_cpu = {(r["image"], r["window"], r["pass"]): r["cpu_ms"] / r["batch"]
                 for r in rows if r["op"] == "local"}
    sizes = sorted({k[0] for k in local})
    growth = {}
    if len(sizes) >= 2:
        lo, hi = (growth_from if growth_from in sizes else sizes[0]), sizes[-1]
        for (n, w, p), ms in local.items():
            if n == hi and (lo, w, p) in local:
                growth[f"{w}x{w} {p} {lo}^2->{hi}^2"] = {
                    "time_ratio": ms / local[lo, w, p],
                    "cpu_time_ratio": local_cpu[n, w, p] / local_cpu[lo, w, p],
                    "pixel_ratio": (hi / lo) ** 2,
                }
    return {"local_time_growth": growth}


# --------------------------------------------------------------------------- #
# Output.                                                                     #
# --------------------------------------------------------------------------- #


def _mib(x: int | None) -> str:
    return "" if not x else f"{x / 2**20:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    head = ("| op | image | window | batch | pass | ms | ms/example | CPU ms | GFLOP | GFLOP/s "
            "| peak MiB | largest array MiB | ratio vs conv (wall) | ratio vs conv (CPU) | note |")
    lines = [head, "|" + "---|" * 15]
    fmt = lambda x: "" if x is None else f"{x:.2f}"
    for r in rows:
        window = f"{r['window']}x{r['window']}" if r["window"] else ""
        lines.append(
            f"| {r['op']} | {r['image']}x{r['image']} | {window} | {r['batch']} | {r['pass']} "
            f"| {r['ms']:.2f} | {r['ms_per_example']:.3f} | {r['cpu_ms']:.1f} "
            f"| {r['gflops']:.3f} | {r['gflop_per_s']:.1f} | {_mib(r['peak_bytes'])} "
            f"| {_mib(r['largest_array_bytes'])} "
            f"| {fmt(r['ratio_vs_conv'])} | {fmt(r['cpu_ratio_vs_conv'])} | {r['note']} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Backend, device and host facts recorded beside the numbers."""
    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep, prints the table, writes the JSON; returns the report."""
    args = parse_args(argv)
    max_bytes = args.max_bytes or default_max_bytes()
    env = environment()
    print(f"# {env['backend']} ({env['device_kind']}), jax {env['jax_version']}, "
          f"{env['cpu_count']} CPUs; load average {_load()}", flush=True)
    load_before, start = _load(), time.time()
    rows = []
    plan = []
    for n in args.sizes:
        if "conv3x3" in args.ops:
            plan += [("conv3x3", p, n, 3) for p in ("fwd", "fwd+bwd")]
        if "local" in args.ops:
            plan += [("local", p, n, w) for w in args.windows for p in ("fwd", "fwd+bwd")]
        if "global" in args.ops:
            plan += [("global", p, n, 0) for p in ("fwd", "fwd+bwd")]
    for op, pass_, n, w in plan:
        row = bench_row(op, pass_, n, w, args, max_bytes)
        rows.append(row)
        print(f"  {op:8s} {n:3d}^2 {('k=' + str(w)) if op == 'local' else '':5s} {pass_:8s} "
              f"b={row['batch']:3d} {row['ms']:9.2f} ms (CPU {row['cpu_ms']:9.1f} ms) "
              f"{row['gflop_per_s']:7.1f} GFLOP/s "
              f"{_mib(row['peak_bytes']):>8s} MiB {row['note']}", file=sys.stderr, flush=True)
    add_ratios(rows)
    report = {
        **env,
        "command": " ".join(["python", "experiments/bench_attention.py", *(argv or sys.argv[1:])]),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"max_bytes": max_bytes},
        "load_average_before": load_before,
        "load_average_after": _load(),
        "wall_s": time.time() - start,
        "flops": {
            "local_forward": "2 * B*H*W * heads * kh*kw * head_dim * 2",
            "global_forward": "2 * B * (H*W)^2 * heads * head_dim * 2",
            "conv3x3_forward": "2 * B*H*W * 9 * C * C",
            "forward+backward": "3 x forward",
        },
        "rows": rows,
        "summary": summarise(rows, args.growth_from),
    }
    print(markdown_table(rows))
    for name, g in report["summary"]["local_time_growth"].items():
        print(f"local {name}: time x{g['time_ratio']:.1f} (CPU x{g['cpu_time_ratio']:.1f}) "
              f"for pixels x{g['pixel_ratio']:.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
