"""Everything the kernel issues ask of an accelerator, in one prepared run.

    PYTHONPATH=. python experiments/accelerator_check.py --out=$OUT     # on a GPU/TPU host
    python experiments/accelerator_check.py --quick                     # CPU smoke run, ~1 min

Runs on whatever backend JAX finds, from the source tree, on synthetic inputs (no
TensorFlow, no data), so that a machine lent for a few minutes gives every figure in
one call. Steps, in this order (the most wanted first):

1. ``check``: every local and global attention kernel this backend can run (``'pallas'``
   and ``'cudnn'`` included where they compile; on CPU ``'pallas_interpret'`` stands in
   for ``'pallas'``), in float32 and bfloat16, against ``'xla'`` computed in float32
   at the highest matmul precision: the output and the gradients of the query, key,
   value, bias and logit scale, on images of 13x11 and 54x54 (no multiple of the tiles)
   and 8x8 with a 5x5 window (``'chunked'`` takes it as one tile), and 37 and 1024
   tokens. Each error is ``max |got - want| / max |want|``; the tolerances
   (`TOLERANCE`) allow TF32 matmuls in float32.
2. ``local_{float32,bfloat16}_4x16``: ``bench_attention.py`` with the 3x3 conv and the
   local kernels, batch 32, 32x32 and 56x56, window 7x7, 4 heads x 16, both dtypes.
3. ``train_small``, ``train_resnet20``: ``bench_train.py`` on one device: ``cnn`` vs
   ``attention_cnn`` on the digits' 8x8x1, and ``resnet20`` vs
   ``resnet20_local_attention`` on 32x32x3.
4. ``global_{float32,bfloat16}``: the conv and the global kernels at 32x32 and 64x64
   (``'cudnn'`` takes 16-bit inputs only).
5. ``local_{float32,bfloat16}_8x32``: step 2 with 8 heads x 32.

Each step runs in its own process group, stopped after three times its estimate or when
the budget runs out; one that fails or times out is recorded and the next one runs. A
step is skipped when less than its own estimate is left of ``--budget_s``. ``--out``
receives three files: ``accelerator.json`` (the environment, each step's status,
command, seconds and report), ``accelerator.md`` (each step's table) and ``log.txt``
(everything the steps printed). Exits 1 if the check step ran and did not pass (a kernel
off, or the step failed or timed out).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from attnflax import cli  # noqa: E402

OUT_FILES = ("accelerator.json", "accelerator.md", "log.txt")
#: A step is stopped after this many times its estimate (or when the budget runs out).
STEP_LIMIT_FACTOR = 3
#: Largest error (relative to the largest reference value) a kernel may show, per dtype.
TOLERANCE = {"float32": 1e-2, "bfloat16": 6e-2}


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_out_flag(flag_values, ", ".join(OUT_FILES), default="runs/accelerator")
    flags.DEFINE_integer("budget_s", 420, "Wall-clock seconds for all steps; a step is "
                         "skipped when less than its estimate is left.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean("quick", False, "Tiny shapes and few repeats: a smoke run of every "
                         "step (CPU).", flag_values=flag_values)
    cli.define_list("steps", [], "Run only these steps (names as in the report; default: all).",
                    flag_values)
    flags.DEFINE_boolean("check_only", False, "Internal: run the check step in this process "
                         "and print its report.", flag_values=flag_values)


# --------------------------------------------------------------------------- #
# The check.                                                                  #
# --------------------------------------------------------------------------- #


def relative_error(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|`` in float32 (0 for an all-zero reference)."""
    import numpy as np

    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want))) / scale if scale else float(np.max(np.abs(got)))


def check_kernels(quick: bool) -> dict[str, Any]:
    """Every kernel this backend can run, against ``'xla'`` at the highest precision."""
    import bench_attention
    import jax
    import jax.numpy as jnp
    import numpy as np

    import attnflax
    from attnflax import ops

    rng = np.random.default_rng(0)
    heads, head_dim = 2, 16
    rows = []

    def case(op: str, fn: Callable[..., Any], arrays: dict[str, np.ndarray], impls: list[str],
             dtype: str, what: str) -> None:
        names = list(arrays)
        cot = rng.standard_normal(jax.eval_shape(
            lambda *a: fn(*a, implementation="xla"), *arrays.values()).shape).astype(np.float32)

        def run(impl: str, cast: Any, *xs: Any) -> Any:
            xs = [x.astype(cast) if n in ("query", "key", "value") else x
                  for n, x in zip(names, xs, strict=True)]
            out, vjp = jax.vjp(lambda *a: fn(*a, implementation=impl), *xs)
            return out, vjp(cot.astype(out.dtype))

        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda *xs: run("xla", jnp.float32, *xs))(*arrays.values())
        for impl in impls:
            row = {"op": op, "case": what, "dtype": dtype, "implementation": impl}
            try:
                got = jax.jit(lambda *xs, impl=impl: run(impl, jnp.dtype(dtype), *xs))(
                    *arrays.values())
                errors = {"output": relative_error(got[0], want[0])}
                errors.update({f"d_{n}": relative_error(g, w)
                               for n, g, w in zip(names, got[1], want[1], strict=True)})
                row.update(errors=errors, max_error=max(errors.values()),
                           ok=max(errors.values()) <= TOLERANCE[dtype])
            except Exception as e:  # a kernel that fails to compile or run is a finding
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            rows.append(row)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sizes = [(13, 11, 7)] if quick else [(13, 11, 7), (13, 11, 3), (54, 54, 7), (8, 8, 5)]
    for dtype in ("float32", "bfloat16"):
        for height, width, window in sizes:
            impls = bench_attention.implementations_of(
                "local", ops.LOCAL_IMPLEMENTATIONS, jnp.dtype(dtype), head_dim, window)
            if jax.default_backend() == "cpu" and dtype == "float32":
                impls.append("pallas_interpret")  # the interpreter computes in float32 only
            arrays = {n: normal(2, height, width, heads, head_dim)
                      for n in ("query", "key", "value")}
            arrays["bias"] = normal(heads, window, window, scale=0.5)
            arrays["logit_scale"] = np.array([10.0, 3.0], np.float32)
            case("local", lambda q, k, v, bias, logit_scale, implementation, window=window:
                 attnflax.local_cosine_attention_2d(
                     q, k, v, window=(window, window), bias=bias, logit_scale=logit_scale,
                     implementation=implementation),
                 arrays, impls, dtype, f"{height}x{width}, {window}x{window}, bias")
        for length in [37] if quick else [37, 1024]:
            impls = bench_attention.implementations_of(
                "global", ops.GLOBAL_IMPLEMENTATIONS, jnp.dtype(dtype), head_dim)
            arrays = {n: normal(2, length, heads, head_dim) for n in ("query", "key", "value")}
            arrays["logit_scale"] = np.array([10.0, 3.0], np.float32)
            case("global", lambda q, k, v, logit_scale, implementation:
                 attnflax.cosine_attention(q, k, v, logit_scale=logit_scale,
                                           implementation=implementation),
                 arrays, impls, dtype, f"{length} tokens")
    return {"rows": rows, "ok": all(r["ok"] for r in rows), "tolerance": TOLERANCE,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def check_table(report: dict[str, Any]) -> str:
    """The check's rows as a markdown table."""
    lines = ["| op | case | dtype | kernel | largest error | ok | note |",
             "|---|---|---|---|--:|---|---|"]
    for r in report["rows"]:
        err = f"{r['max_error']:.2e}" if "max_error" in r else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['implementation']} | "
                     f"{err} | {'yes' if r['ok'] else '**no**'} | {r.get('error', '')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The steps.                                                                  #
# --------------------------------------------------------------------------- #


def plan(quick: bool) -> list[tuple[str, list[str], int]]:
    """``[(step, argv of the script, estimated seconds)]`` in the order they run."""
    me = [os.path.join(HERE, "accelerator_check.py"), "--check_only"] + (
        ["--quick"] if quick else [])
    attention = [os.path.join(HERE, "bench_attention.py")]
    train = [os.path.join(HERE, "bench_train.py"), "--devices=1", "--rounds=1", "--platform=auto"]
    if quick:
        attention += ["--quick"]
        train += ["--batch=8", "--steps=1", "--repeats=1"]
        local = ["--ops=conv3x3,local", "--implementations=xla,chunked,pallas"]
        glob = ["--ops=conv3x3,global", "--implementations=xla,chunked,cudnn"]
        return [("check", me, 60),
                ("local_float32_4x16", attention + local, 20),
                ("global_float32", attention + glob, 20),
                ("train_small", train + ["--models=cnn,attention_cnn", "--image=8,8,1"], 40),
                ("train_resnet20", train + ["--models=resnet20,resnet20_local_attention",
                                            "--image=8,8,3"], 60)]
    attention += ["--batch=32", "--repeats=20", "--warmup=3"]
    train += ["--batch=128", "--steps=20", "--repeats=5"]
    steps = [("check", me, 90)]
    local = ["--sizes=32,56", "--windows=7", "--ops=conv3x3,local",
             "--implementations=xla,chunked,pallas"]
    for dtype in ("float32", "bfloat16"):
        steps.append((f"local_{dtype}_4x16", attention + local + [
            f"--dtype={dtype}", "--heads=4", "--head_dim=16"], 60))
    steps.append(("train_small", train + ["--models=cnn,attention_cnn", "--image=8,8,1"], 60))
    steps.append(("train_resnet20", train + ["--models=resnet20,resnet20_local_attention",
                                             "--image=32,32,3"], 90))
    for dtype in ("float32", "bfloat16"):
        steps.append((f"global_{dtype}", attention + [
            "--sizes=32,64", "--ops=conv3x3,global", "--implementations=xla,chunked,cudnn",
            f"--dtype={dtype}"], 60))
    for dtype in ("float32", "bfloat16"):
        steps.append((f"local_{dtype}_8x32", attention + local + [
            f"--dtype={dtype}", "--heads=8", "--head_dim=32"], 60))
    return steps


def run_step(argv: list[str], out: str, limit: float) -> dict[str, Any]:
    """Runs one step's script with ``--out=out``; its status, seconds, output and report.
    The script runs in its own process group, and all of it is killed at ``limit``
    seconds (``bench_train.py`` starts children of its own, which would otherwise keep
    the accelerator)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv, f"--out={out}"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = f"timed out after {limit:.0f} s"
    stdout, stderr = (x.decode(errors="replace") for x in (stdout, stderr))
    report = None
    for name in ("check.json", "attention.json", "train.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1),
            "stdout": stdout, "stderr": stderr, "report": report}


def environment() -> dict[str, Any]:
    """The backend, device and versions (asked in a child, so this process never holds the
    accelerator the steps need)."""
    code = ("import json, jax, flax; d = jax.devices()[0]; print(json.dumps({'backend': "
            "jax.default_backend(), 'device_kind': d.device_kind, 'device_count': "
            "jax.device_count(), 'jax': jax.__version__, 'flax': flax.__version__}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tables(name: str, result: dict[str, Any]) -> str:
    """A step's section of ``accelerator.md``: its table (the markdown lines it printed)."""
    head = f"## {name}: {result['status']}, {result['seconds']} s\n\n"
    lines = [ln for ln in result["stdout"].splitlines() if ln.startswith(("|", "#", "local ",
                                                                         "backend "))]
    return head + ("\n".join(lines) if lines else "(no table)") + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the steps, writes the three files; returns the report."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="accelerator_check.py")
    if args.check_only:
        report = check_kernels(args.quick)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(check_table(report))
        return report
    steps = plan(args.quick)
    unknown = set(args.steps) - {name for name, _, _ in steps}
    if unknown:
        cli.usage_error("accelerator_check.py", f"--steps: unknown {sorted(unknown)}; the "
                        f"steps are {', '.join(name for name, _, _ in steps)}.")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "budget_s": args.budget_s,
                              "steps": {}}
    print(f"# {json.dumps(report['environment'])}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    md, log = [f"# Accelerator check\n\n{json.dumps(report['environment'])}\n"], []
    with tempfile.TemporaryDirectory() as scratch:
        for name, step_argv, estimate in steps:
            if args.steps and name not in args.steps:
                continue
            left = args.budget_s - (time.perf_counter() - t0)
            if left < estimate:
                report["steps"][name] = {"status": f"skipped ({left:.0f} s of the budget left, "
                                                   f"estimate {estimate} s)"}
                print(f"{name}: {report['steps'][name]['status']}", flush=True)
                continue
            limit = min(left, STEP_LIMIT_FACTOR * estimate)
            result = run_step(step_argv, os.path.join(scratch, name), limit)
            print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
            md.append(tables(name, result))
            log.append(f"===== {name}: {' '.join(step_argv)}\n{result['stdout']}\n"
                       f"{result['stderr']}")
            report["steps"][name] = {"command": " ".join(step_argv), **{
                k: v for k, v in result.items() if k not in ("stdout", "stderr")}}
            write(args.out, report, md, log)  # after every step: a killed run keeps its part
    check = report["steps"].get("check")
    if check is not None:  # planned: it passed, or a kernel failed, or it did not finish
        report["checks_passed"] = bool((check.get("report") or {}).get("ok"))
    write(args.out, report, md, log)
    print("\n".join(md))
    if report.get("checks_passed") is False:
        print(f"the kernel check did not pass ({check['status']}): see accelerator.md",
              file=sys.stderr)
        raise SystemExit(1)
    return report


def write(out: str, report: dict[str, Any], md: list[str], log: list[str]) -> None:
    """Writes the three files of ``--out``."""
    for name, text in zip(OUT_FILES, (json.dumps(report, indent=2), "\n".join(md),
                                      "\n".join(log)), strict=True):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
