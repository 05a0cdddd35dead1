"""Benchmark of the attention kernels: local vs 3x3 conv vs global attention, per kernel.

Times the forward pass and the forward+backward pass of
:func:`attnflax.local_cosine_attention_2d` for several windows and image sizes,
beside a 3x3 convolution of the same width (``lax.conv_general_dilated``, NHWC)
and beside global :func:`attnflax.cosine_attention` over the flattened image, once
per ``--implementations`` entry (the ``implementation=`` of the two functions; an
entry a function does not have, or that cannot run on this backend, is skipped).
Runs on whatever backend JAX finds (CPU, GPU, TPU), on synthetic inputs: no
TensorFlow, no data.

Usage::

    python experiments/bench_attention.py                  # the full default sweep
    python experiments/bench_attention.py --quick          # a tiny smoke run
    python experiments/bench_attention.py --sizes=32 --windows=7 --batch=32 --repeats=9
    python experiments/bench_attention.py --implementations=xla,chunked

What is timed: every op of one image size is ``jax.jit``-compiled first, run
``--warmup`` times (not timed, so compilation is excluded), then timed in
``--repeats`` interleaved rounds (each round runs every op of that size once, with
``block_until_ready``), so that every contender sees the same machine load; the
table shows the median, and the JSON every run (``ms_all``) and the minimum. Forward+backward is
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
blocked local kernels (each ``T x T`` tile of queries attends densely to its
``(T+2r)^2`` halo: about 4x ``kh*kw`` keys per pixel with ``'xla'``'s ``T = 2r+2``, about
2x with ``'chunked'``'s ``T = r+1``): GFLOP/s is *useful*
work per second. ``ratio_vs_conv`` compares per-example times with the conv of
the same size and pass.

Memory: ``peak_bytes`` is the compiled program's ``memory_analysis()``
argument + output + temp bytes (what XLA plans to allocate), and
``largest_array_bytes`` the largest array in the optimised HLO (fusions
included: on CPU XLA fuses global attention's logits matmul into the softmax and
allocates the logits inside the fused kernel, outside the plan). On GPU the
device's ``peak_bytes_in_use`` (a process-wide high-water mark) is recorded too,
on CPU the process's peak RSS. When a program would exceed ``--max_bytes``
(plan, or arguments + outputs + largest array) the batch is halved until it
fits, and the row says so.

``attention.json``, written into ``--out`` (a folder, default ``runs/bench``), holds the
backend, device kind, JAX version, CPU count, load average, the configuration and one row
per (op, size, window, pass).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

import attnflax
from attnflax import cli
from attnflax.report import markdown_table

# Imported at their first use, after the flags are parsed.
jax = cli.lazy_import("jax")
jnp = cli.lazy_import("jax.numpy")
ops = cli.lazy_import("attnflax.ops")
ops_attention = cli.lazy_import("attnflax.ops.attention")

LOGIT_SCALE = 10.0
OUT_FILE = "attention.json"
OPS = ("local", "conv3x3", "global")


def _odd(window: int) -> str | None:
    return None if window >= 1 and window % 2 else f"windows must be odd and >= 1; got {window}."


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"sizes must be >= 1; got {value}."


def _op(name: str) -> str | None:
    return None if name in OPS else f"unknown op {name!r}; ops: {', '.join(OPS)}."


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_list("sizes", [8, 16, 32, 64], "Square image sizes H = W.", flag_values,
                    item=int, check=_positive)
    cli.define_list("windows", [3, 5, 7], "Odd square local-attention windows k (k x k).",
                    flag_values, item=int, check=_odd)
    flags.DEFINE_integer("batch", 32, "Batch size (halved to fit --max_bytes).", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("heads", 4, "Attention heads.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("head_dim", 16, "Dimensions per head (width = heads * head_dim).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("warmup", 1, "Untimed runs after compilation.", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_float("max_bytes", None, "Per-program memory budget in bytes (default: 2 GiB "
                       "on CPU, half the device memory on an accelerator).",
                       flag_values=flag_values)
    cli.define_list("ops", OPS, "Ops to time.", flag_values, check=_op)
    flags.DEFINE_list("implementations", ["xla", "chunked", "pallas", "cudnn"], "Kernels of "
                      "the attention ops (attnflax.ops.LOCAL_IMPLEMENTATIONS, "
                      "GLOBAL_IMPLEMENTATIONS); those an op lacks or the backend cannot run "
                      "are skipped.", flag_values=flag_values)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.",
                      flag_values=flag_values)
    flags.DEFINE_integer("growth_from", 16, "Image size from which time growth (to the "
                         "largest size) is summarised.", flag_values=flag_values)
    cli.define_out_flag(flag_values, f"{OUT_FILE} (the report)", default="runs/bench")
    flags.DEFINE_boolean("quick", False, "Tiny smoke run: size 8, window 3, batch 2, "
                         "1 repeat.", flag_values=flag_values)


def parse_args(argv: Sequence[str] | None = None) -> Any:
    """Command-line flags (``--quick`` sets the sizes, windows, batch and repeats)."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="bench_attention.py")
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


def implementations_of(
    op: str, wanted: Sequence[str], dtype: Any, head_dim: int, window: int = 3
) -> list[str]:
    """The kernels of ``op`` among ``wanted`` that can run here (``[None]`` for the conv)."""
    if op == "conv3x3":
        return [None]
    names = ops.LOCAL_IMPLEMENTATIONS if op == "local" else ops.GLOBAL_IMPLEMENTATIONS
    usable = [n for n in wanted if n in names]
    if op == "global" and ops_attention.cudnn_unsupported(dtype, head_dim) is not None:
        usable = [n for n in usable if n != "cudnn"]
    if op == "local":  # 'pallas' where it compiles (the interpreter is not a benchmark)
        usable = [n for n in usable if n != "pallas_interpret" and not (
            n == "pallas"
            and ops_attention.pallas_unsupported(n, dtype, (window, window)) is not None)]
    return usable


def make_op(
    op: str, b: int, n: int, heads: int, d: int, window: int, dtype: Any,
    implementation: str | None = None,
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
        fn = lambda q, k, v: attnflax.local_cosine_attention_2d(
            q, k, v, window=(window, window), logit_scale=LOGIT_SCALE,
            implementation=implementation,
        )
    else:
        shape = (b, n * n, heads, d)
        fn = lambda q, k, v: attnflax.cosine_attention(
            q, k, v, logit_scale=LOGIT_SCALE, implementation=implementation)
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
    max_bytes: float, implementation: str | None = None,
) -> tuple[Any, tuple[jax.Array, ...], int, dict[str, int]]:
    """Compiles the op, halving the batch until its planned memory fits ``max_bytes``."""
    while True:
        fn, inputs = make_op(op, batch, n, heads, d, window, dtype, implementation)
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


def time_interleaved(
    programs: Sequence[tuple[Any, Sequence[jax.Array]]], warmup: int, repeats: int
) -> list[tuple[list[float], list[float]]]:
    """Wall-clock and process-CPU milliseconds of each program: ``warmup`` untimed runs
    each, then ``repeats`` rounds that run every program once in turn (so all see the
    same load). CPU time (all threads of this process) is steadier than wall time on a
    shared host; on an idle host wall time is the one that matters."""
    for compiled, inputs in programs:
        for _ in range(warmup):
            jax.block_until_ready(compiled(*inputs))
    times = [([], []) for _ in programs]
    for _ in range(repeats):
        for (compiled, inputs), (wall, cpu) in zip(programs, times, strict=True):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*inputs))
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return times


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


def prepare_row(
    op: str, impl: str | None, pass_: str, n: int, window: int, args: Any,
    max_bytes: float,
) -> dict[str, Any]:
    """Compiles one (op, kernel, image size, window, pass); the row without timings."""
    dtype = jnp.dtype(args.dtype)
    heads, d = args.heads, args.head_dim
    compiled, inputs, batch, mem = compile_fitting(
        op, pass_, args.batch, n, heads, d, window, dtype, max_bytes, impl
    )
    if op == "local":
        flops = local_flops(batch, n, heads, d, window)
    elif op == "global":
        flops = global_flops(batch, n, heads, d)
    else:
        flops = conv_flops(batch, n, heads * d)
    flops *= 1 if pass_ == "fwd" else 3
    note = ""
    if batch != args.batch:
        note = f"batch reduced {args.batch}->{batch} to fit {max_bytes / 2**30:.1f} GiB"
    return {
        "op": op, "implementation": impl, "pass": pass_, "image": n,
        "window": window if op == "local" else None, "batch": batch, "heads": heads,
        "head_dim": d, "width": heads * d, "dtype": args.dtype, "gflops": flops / 1e9, **mem,
        "note": note, "_program": (compiled, inputs),
    }


def finish_row(row: dict[str, Any], times: list[float], cpu_times: list[float]) -> None:
    """Adds the timings (and the process's memory high-water marks so far) to a row."""
    del row["_program"]
    ms = statistics.median(times)
    row.update({
        "ms": ms, "ms_min": min(times), "ms_max": max(times), "ms_all": times,
        "ms_per_example": ms / row["batch"], "cpu_ms": statistics.median(cpu_times),
        "cpu_ms_all": cpu_times, "gflop_per_s": row["gflops"] / (ms / 1e3),
        "device_peak_bytes": device_peak_bytes(),
        "process_peak_rss_bytes": process_peak_rss_bytes(),
    })


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_vs_conv`` (wall) and ``cpu_ratio_vs_conv`` (process CPU time): per-example
    time over the 3x3 conv's at the same image size and pass; ``ratio_vs_conv_fwd``:
    over the conv's *forward* (the yardstick for forward+backward rows); and
    ``peak_ratio_vs_conv``: planned peak memory over the conv's at the same pass."""
    convs = {(r["image"], r["pass"]): r for r in rows if r["op"] == "conv3x3"}
    per_ex = lambda r: r["ms_per_example"]
    for r in rows:
        base = convs.get((r["image"], r["pass"]))
        base_fwd = convs.get((r["image"], "fwd"))
        if base is None or r["op"] == "conv3x3":
            r["ratio_vs_conv"] = r["cpu_ratio_vs_conv"] = r["ratio_vs_conv_fwd"] = None
            r["peak_ratio_vs_conv"] = None
            continue
        r["ratio_vs_conv"] = per_ex(r) / per_ex(base)
        r["cpu_ratio_vs_conv"] = (r["cpu_ms"] / r["batch"]) / (base["cpu_ms"] / base["batch"])
        r["ratio_vs_conv_fwd"] = None if base_fwd is None else per_ex(r) / per_ex(base_fwd)
        r["peak_ratio_vs_conv"] = (r["peak_bytes"] / r["batch"]) / max(
            base["peak_bytes"] / base["batch"], 1)


def summarise(rows: list[dict[str, Any]], growth_from: int) -> dict[str, Any]:
    """Growth of local-attention time with pixels, per window and pass (per example), from
    size ``growth_from`` (or the smallest size) to the largest."""
    local = {(r["image"], (r["window"], r["implementation"]), r["pass"]): r["ms_per_example"]
             for r in rows if r["op"] == "local"}
    local_cpu = {(r["image"], (r["window"], r["implementation"]), r["pass"]):
                 r["cpu_ms"] / r["batch"] for r in rows if r["op"] == "local"}
    sizes = sorted({k[0] for k in local})
    growth = {}
    if len(sizes) >= 2:
        lo, hi = (growth_from if growth_from in sizes else sizes[0]), sizes[-1]
        for (n, w, p), ms in local.items():
            if n == hi and (lo, w, p) in local:
                growth[f"{w[0]}x{w[0]} {w[1]} {p} {lo}^2->{hi}^2"] = {
                    "time_ratio": ms / local[lo, w, p],
                    "cpu_time_ratio": local_cpu[n, w, p] / local_cpu[lo, w, p],
                    "pixel_ratio": (hi / lo) ** 2,
                }
    return {"local_time_growth": growth, "targets": targets(rows)}


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """One line per kernel on the figures the kernels are judged by (where the sweep has
    the rows): local 7x7 at 32x32 forward and forward+backward over the conv's forward,
    local forward+backward planned peak over the conv's, global peak and time."""
    find = lambda **kw: [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
    lines = []
    for r in find(op="local", image=32, window=7, **{"pass": "fwd"}):
        fb = find(op="local", image=32, window=7, implementation=r["implementation"],
                  **{"pass": "fwd+bwd"})
        if r["ratio_vs_conv_fwd"] is None or not fb:
            continue
        lines.append(f"local 7x7 32^2 [{r['implementation']}]: forward "
                     f"{r['ratio_vs_conv_fwd']:.2f}x the conv forward, forward+backward "
                     f"{fb[0]['ratio_vs_conv_fwd']:.2f}x the conv forward")
    for r in find(op="local", window=7, **{"pass": "fwd+bwd"}):
        if r["image"] in (32, 64) and r["peak_ratio_vs_conv"] is not None:
            lines.append(f"local 7x7 {r['image']}^2 [{r['implementation']}]: forward+backward "
                         f"planned peak {r['peak_ratio_vs_conv']:.2f}x the conv's "
                         f"({_mib(r['peak_bytes'])} MiB at batch {r['batch']})")
    for r in find(op="global", **{"pass": "fwd+bwd"}):
        if r["image"] == 64:
            lines.append(f"global 64^2 [{r['implementation']}]: forward+backward planned peak "
                         f"{_mib(r['peak_bytes'])} MiB at batch {r['batch']}")
    for r in find(op="global", image=32, **{"pass": "fwd"}):
        lines.append(f"global 32^2 [{r['implementation']}]: forward {r['ms_per_example']:.2f} "
                     f"ms/example, {r['ratio_vs_conv']:.1f}x the conv")
    return lines


# --------------------------------------------------------------------------- #
# Output.                                                                     #
# --------------------------------------------------------------------------- #


def _mib(x: int | None) -> str:
    return "" if not x else f"{x / 2**20:.1f}"


HEADERS = ("op", "kernel", "image", "window", "batch", "pass", "ms (median)", "min", "max",
           "CPU ms", "GFLOP", "GFLOP/s", "peak MiB", "largest array MiB",
           "vs conv same pass (wall)", "vs conv fwd (wall)", "vs conv (CPU)", "peak vs conv",
           "note")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The cells of the markdown table (`HEADERS`), one list per measured row."""
    fmt = lambda x: "" if x is None else f"{x:.2f}"
    return [[
        r["op"], r["implementation"] or "", f"{r['image']}x{r['image']}",
        f"{r['window']}x{r['window']}" if r["window"] else "", str(r["batch"]), r["pass"],
        f"{r['ms']:.2f}", f"{r['ms_min']:.2f}", f"{r['ms_max']:.2f}", f"{r['cpu_ms']:.1f}",
        f"{r['gflops']:.3f}", f"{r['gflop_per_s']:.1f}", _mib(r["peak_bytes"]),
        _mib(r["largest_array_bytes"]), fmt(r["ratio_vs_conv"]), fmt(r["ratio_vs_conv_fwd"]),
        fmt(r["cpu_ratio_vs_conv"]), fmt(r["peak_ratio_vs_conv"]), r["note"],
    ] for r in rows]


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
    dtype = jnp.dtype(args.dtype)
    for n in args.sizes:  # one size at a time: compile its ops, then time them interleaved
        plan = []
        if "conv3x3" in args.ops:
            plan += [("conv3x3", None, p, 3) for p in ("fwd", "fwd+bwd")]
        if "local" in args.ops:
            plan += [("local", i, p, w) for w in args.windows
                     for i in implementations_of("local", args.implementations, dtype,
                                                 args.head_dim, w)
                     for p in ("fwd", "fwd+bwd")]
        if "global" in args.ops:
            plan += [("global", i, p, 0)
                     for i in implementations_of("global", args.implementations, dtype,
                                                 args.head_dim)
                     for p in ("fwd", "fwd+bwd")]
        size_rows = [prepare_row(op, i, p, n, w, args, max_bytes) for op, i, p, w in plan]
        timings = time_interleaved([r["_program"] for r in size_rows], args.warmup,
                                   args.repeats)
        for row, (times, cpu_times) in zip(size_rows, timings, strict=True):
            finish_row(row, times, cpu_times)
            rows.append(row)
            print(f"  {row['op']:8s} {row['implementation'] or '':8s} {n:3d}^2 "
                  f"{('k=' + str(row['window'])) if row['op'] == 'local' else '':5s} "
                  f"{row['pass']:8s} b={row['batch']:3d} {row['ms']:9.2f} ms "
                  f"(CPU {row['cpu_ms']:9.1f} ms) {row['gflop_per_s']:7.1f} GFLOP/s "
                  f"{_mib(row['peak_bytes']):>8s} MiB {row['note']}", file=sys.stderr,
                  flush=True)
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
    print(markdown_table(HEADERS, table_rows(rows)))
    for line in report["summary"]["targets"]:
        print(line)
    for name, g in report["summary"]["local_time_growth"].items():
        print(f"local {name}: time x{g['time_ratio']:.1f} (CPU x{g['cpu_time_ratio']:.1f}) "
              f"for pixels x{g['pixel_ratio']:.0f}")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, OUT_FILE)
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
