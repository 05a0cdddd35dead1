r"""Training throughput and compile time per model on 1, 2, 4 and 8 devices.

    python experiments/bench_train.py                         # CPU: forced host devices
    python experiments/bench_train.py --models cnn attention_cnn resnet20 \
        --batch 256 --image 32,32,3 --devices 1 2 4 8
    python experiments/bench_train.py --devices 1 --attention-implementations xla chunked

Models with attention layers get one row per ``--attention-implementations`` entry
(``attention_cnn[chunked]``; ``default`` = the op's own choice), and within one device
count every model's compiled step is timed in ``--repeats`` interleaved rounds of
``--steps`` steps: images/s is the median round (min and max beside it), and
``vs first model`` is each row's median over the first model's (e.g. attention_cnn's
throughput as a fraction of the cnn's).

For each device count the script starts a child process with that many devices
(``--xla_force_host_platform_device_count`` on CPU; on a GPU/TPU host the first N
real devices), builds the model, optimiser and sharded train state exactly as
``attnflax.train`` does, compiles the train step ahead of time (the compile time),
then times ``--steps`` steps on a fixed random batch of the global size (data
loading excluded: `experiments/inspect_data.py --benchmark` times the input
pipeline). It prints a markdown table and writes JSON (default
``runs/bench/train.json``).

Speed-up is ``images/s on N devices / images/s on 1 device`` and scaling efficiency
is ``speed-up / N`` (strong scaling at a fixed global batch).
Forced CPU devices share the same physical cores, so on a CPU host it measures the
overhead of the data-parallel layout rather than a speed-up; on real accelerators
it is the usual weak-scaling figure at a fixed global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "attention_cnn"],
                   help="registry names (attnflax.models.list_models())")
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument("--image", default="8,8,1", help="input shape h,w,c")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved timing rounds (after 2 warm-up steps per model)")
    p.add_argument("--attention-implementations", nargs="+", default=["default"],
                   help="kernels for the models with attention layers: default (the op "
                        "picks), xla, chunked, cudnn")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--platform", default="auto",
                   help="'cpu' forces host devices; 'auto' uses the accelerator if present")
    p.add_argument("--out", default="runs/bench/train.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a process whose device count is already set; returns one row per model."""
    import jax
    import numpy as np

    from attnflax import models, parallel, train

    n = int(args.child)
    if jax.device_count() < n:
        raise SystemExit(f"asked for {n} devices, {jax.device_count()} available")
    shape = tuple(int(s) for s in args.image.split(","))
    mesh = parallel.create_mesh(n)
    parallel.check_batch_size(args.batch, mesh)
    contenders = []  # (row name, model name, attention implementation or None)
    for name in args.models:
        impls = [None]
        if "attention_implementation" in models.model_fields(name):
            impls = [None if i == "default" else i for i in args.attention_implementations]
        for impl in impls:
            contenders.append((name if impl is None else f"{name}[{impl}]", name, impl))
    rng = np.random.default_rng(0)
    batch = parallel.host_to_global({
        "image": rng.normal(size=(args.batch, *shape)).astype(np.float32),
        "label": rng.integers(0, args.num_classes, size=args.batch).astype(np.int32),
        "mask": np.ones(args.batch, bool),
    }, mesh)
    runs = []
    for label, name, impl in contenders:
        config = train.default_config()
        config.model, config.dtype = name, args.dtype
        config.attention_implementation = impl
        config.data.batch_size = args.batch
        model = train.create_model(config, args.num_classes)
        tx, schedule = train.create_optimizer(config, total_steps=10_000, warmup_steps=100)
        state, shardings = train.create_train_state(model, tx, shape, 0, mesh)
        step = jax.jit(
            lambda s, b, model=model, tx=tx, schedule=schedule: train.train_step(
                s, b, model=model, tx=tx, schedule=schedule, num_classes=args.num_classes,
                label_smoothing=0.0, grad_accum_steps=1, mesh=mesh),
            in_shardings=(shardings, parallel.batch_sharding(mesh)),
            out_shardings=(shardings, parallel.replicated(mesh)),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        runs.append({"label": label, "name": name, "impl": impl, "compiled": compiled,
                     "state": state, "compile_s": compile_s, "seconds": []})
    for _ in range(args.repeats):  # interleaved rounds: every model sees the same load
        for run in runs:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run["state"], m = run["compiled"](run["state"], batch)
            jax.block_until_ready(m)
            run["seconds"].append(time.perf_counter() - t0)
    rows = []
    for run in runs:
        ips = sorted(args.batch * args.steps / s for s in run["seconds"])
        median = statistics.median(ips)
        rows.append({
            "model": run["label"], "registry_name": run["name"],
            "attention_implementation": run["impl"], "devices": n,
            "global_batch": args.batch, "params": train.count_params(run["state"].params),
            "compile_seconds": round(run["compile_s"], 3),
            "step_ms": round(1000 * args.batch / median, 3),
            "images_per_second": round(median, 1),
            "images_per_second_min": round(ips[0], 1),
            "images_per_second_max": round(ips[-1], 1),
        })
    return {"rows": rows, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def run_child(args: argparse.Namespace, n: int, argv: list[str]) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    proc = subprocess.run([sys.executable, __file__, *argv, f"--child={n}"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {n}-device run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    runs = [run_child(args, n, argv) for n in args.devices]
    rows = [r for run in runs for r in run["rows"]]
    n0 = min(args.devices)
    base = {r["model"]: r["images_per_second"] for r in rows if r["devices"] == n0}
    for r in rows:
        first = next(x for x in rows if x["devices"] == r["devices"])
        r["speedup"] = round(r["images_per_second"] / base[r["model"]], 3)
        r["scaling_efficiency"] = round(r["speedup"] * n0 / r["devices"], 3)
        r["vs_first_model"] = round(r["images_per_second"] / first["images_per_second"], 3)
        r["compile_vs_first_model"] = round(r["compile_seconds"] / first["compile_seconds"], 3)
    header = ("| model | devices | global batch | params | compile s | step ms "
              "| images/s (median) | min | max | vs first model | compile vs first "
              "| speed-up | scaling efficiency |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:"
              "|--:|--:|")
    print(f"backend {runs[0]['backend']} ({runs[0]['device_kind']}), jax {runs[0]['jax']}, "
          f"{os.cpu_count()} CPUs, image {args.image}, {args.dtype}, {args.repeats} rounds "
          f"of {args.steps} steps")
    print(header)
    for r in rows:
        print(f"| {r['model']} | {r['devices']} | {r['global_batch']} | {r['params']:,} | "
              f"{r['compile_seconds']:.1f} | {r['step_ms']:.1f} | {r['images_per_second']:,.0f} "
              f"| {r['images_per_second_min']:,.0f} | {r['images_per_second_max']:,.0f} "
              f"| {r['vs_first_model']:.2f} | {r['compile_vs_first_model']:.2f} "
              f"| {r['speedup']:.2f} | {r['scaling_efficiency']:.2f} |")
    report = {"rows": rows, "backend": runs[0]["backend"], "device_kind": runs[0]["device_kind"],
              "jax": runs[0]["jax"], "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "args": {k: v for k, v in vars(args).items() if k != "child"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
