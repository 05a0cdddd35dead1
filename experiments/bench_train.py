r"""Training throughput and compile time per model on 1, 2, 4 and 8 devices.

    python experiments/bench_train.py                         # CPU: forced host devices
    python experiments/bench_train.py --models=cnn,attention_cnn,resnet20 \
        --batch=256 --image=32,32,3 --devices=1,2,4,8 --rounds=5
    python experiments/bench_train.py --devices=1 --attention_implementations=xla,chunked
    python experiments/bench_train.py --devices=1 --models=resnet20,resnet20_local_attention \
        --image=32,32,3

``--models`` takes registry names (``attnflax.models.list_models()``, default attributes)
and the named variants of ``attnflax.configs.recipes.MODEL_VARIANTS`` (e.g.
``resnet20_local_attention``: ResNet-20 with 7x7 local attention blocks in stages 2 and 3).
Models with attention layers get one row per ``--attention_implementations`` entry
(``attention_cnn[chunked]``; ``default`` = the op's own choice).

Each device count runs in its own child process (``--xla_force_host_platform_device_count``
on CPU; on a GPU/TPU host the first N real devices), which builds the model, optimiser
and sharded train state exactly as ``attnflax.train`` does, compiles the train step
ahead of time (the compile time), then times ``--repeats`` interleaved rounds of
``--steps`` steps of every model on a fixed random batch of the global size (data
loading excluded: `experiments/inspect_data.py --benchmark` times the input pipeline).

**Noise.** One child per device count is one sample: on a shared machine a single
sample's "speed-up" is noise (four single-sample runs once gave 0.82-1.85 for 2 CPU
devices). So the children are repeated over ``--rounds`` rounds that alternate the
device counts (``1 2 4 8``, then ``8 4 2 1``, ...), so that drifting load hits every
count alike. Per model and device count the table gives the median images/s over all
timed samples with min and max beside it; the speed-up ``images/s on N devices /
images/s on the fewest`` is computed within each round (the children of one round ran
minutes apart at most) and reported as median, min and max over the rounds. A
min-max span of the speed-up that straddles 1 means the difference is not measured.

**Which scaling.** The global batch is fixed (``--batch``) whatever the device count,
so each device gets ``batch / N`` examples: this is **strong scaling**, and the scaling
efficiency is ``speed-up / (N / N_fewest)``. Forced CPU devices share the host's cores,
so on a CPU host it measures the overhead of the data-parallel layout rather than a
speed-up to expect; on real accelerators it is the usual strong-scaling figure.

Prints a markdown table and writes ``train.json`` into ``--out`` (a folder, default
``runs/bench``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from attnflax import cli

OUT_FILE = "train.json"


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    flags.DEFINE_list("models", ["cnn", "attention_cnn"], "Registry names "
                      "(attnflax.models.list_models()) or named variants "
                      "(attnflax.configs.recipes.MODEL_VARIANTS).", flag_values=flag_values)
    cli.define_list("devices", [1, 2, 4, 8], "Device counts.", flag_values, item=int,
                    check=lambda n: None if n >= 1 else f"device counts must be >= 1; got {n}.")
    flags.DEFINE_integer("batch", 128, "Global batch size.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string("image", "8,8,1", "Input shape h,w,c.", flag_values=flag_values)
    flags.DEFINE_integer("num_classes", 10, "Classes.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("steps", 20, "Timed steps per round.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds of the models within one "
                         "child process (after 2 warm-up steps per model).", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("rounds", 3, "Child processes per device count, alternating the "
                         "device counts (speed-up: median, min, max over the rounds).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_list("attention_implementations", ["default"], "Kernels for the models with "
                      "attention layers: default (the op picks), xla, chunked, cudnn.",
                      flag_values=flag_values)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.",
                      flag_values=flag_values)
    flags.DEFINE_string("platform", "auto", "'cpu' forces host devices; 'auto' uses the "
                        "accelerator if present.", flag_values=flag_values)
    cli.define_out_flag(flag_values, f"{OUT_FILE} (the report)", default="runs/bench")
    flags.DEFINE_integer("child", None, "Internal: run as the child process of this many "
                         "devices.", flag_values=flag_values)


def parse_args(argv: Sequence[str] | None = None) -> Any:
    """Command-line flags."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="bench_train.py")
    try:
        args.shape = tuple(int(s) for s in args.image.split(","))
    except ValueError:
        cli.usage_error("bench_train.py", f"--image must be h,w,c integers; got {args.image!r}.")
    for name in args.models:
        try:
            resolve_model(name)
        except ValueError as e:
            cli.usage_error("bench_train.py", f"--models: {e}")
    return args


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry model, model_kwargs)`` of a ``--models`` entry: a registry name with its
    default attributes, else a named variant.

    Raises:
      ValueError: naming both lists, for a name in neither.
    """
    from attnflax import models
    from attnflax.configs import recipes

    if name in models.list_models():
        return name, {}
    if name in recipes.MODEL_VARIANTS:
        return recipes.model_variant(name)
    raise ValueError(f"unknown model {name!r}; registry names: {', '.join(models.list_models())}; "
                     f"named variants: {', '.join(recipes.MODEL_VARIANTS)}.")


def child(args: Any) -> dict[str, Any]:
    """Runs in a process whose device count is already set; returns one row per model."""
    import jax
    import numpy as np

    from attnflax import models, parallel, pytree, train
    from attnflax.data import config as data_config

    n = int(args.child)
    if jax.device_count() < n:
        raise SystemExit(f"asked for {n} devices, {jax.device_count()} available")
    shape = args.shape
    mesh = parallel.create_mesh(n)
    data_config.check_batch_size("batch_size", args.batch, mesh.size, jax.process_count(),
                                 flag="--batch")
    contenders = []  # (row name, registry model, its kwargs, attention implementation)
    for name in args.models:
        registry_name, kwargs = resolve_model(name)
        impls = [None]
        if "attention_implementation" in models.model_fields(registry_name):
            impls = [None if i == "default" else i for i in args.attention_implementations]
        for impl in impls:
            contenders.append((name if impl is None else f"{name}[{impl}]", registry_name,
                               kwargs, impl))
    rng = np.random.default_rng(0)
    batch = parallel.host_to_global({
        "image": rng.normal(size=(args.batch, *shape)).astype(np.float32),
        "label": rng.integers(0, args.num_classes, size=args.batch).astype(np.int32),
        "mask": np.ones(args.batch, bool),
    }, mesh)
    runs = []
    for label, name, kwargs, impl in contenders:
        config = train.default_config()
        config.model, config.dtype = name, args.dtype
        config.model_kwargs.update(kwargs)
        config.attention_implementation = impl
        config.data.batch_size = args.batch
        model = train.create_model(config, args.num_classes)
        tx, schedule = train.create_optimizer(config, total_steps=10_000, warmup_steps=100)
        state, shardings = train.create_train_state(model, tx, shape, 0, mesh)
        step = jax.jit(
            lambda s, b, model=model, tx=tx, schedule=schedule: train.train_step(
                s, b, model=model, tx=tx, schedule=schedule,
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
            "global_batch": args.batch, "params": pytree.count_params(run["state"].params),
            "compile_seconds": round(run["compile_s"], 3),
            "step_ms": round(1000 * args.batch / median, 3),
            "images_per_second": round(median, 1),
            "images_per_second_min": round(ips[0], 1),
            "images_per_second_max": round(ips[-1], 1),
            "images_per_second_samples": [round(x, 1) for x in ips],
        })
    return {"rows": rows, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def run_child(args: Any, n: int, argv: Sequence[str]) -> dict[str, Any]:
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


def round_order(devices: list[int], rounds: int) -> list[tuple[int, int]]:
    """``[(round, devices), ...]``: the device counts in order, then reversed, alternating."""
    out = []
    for r in range(rounds):
        out += [(r, n) for n in (devices if r % 2 == 0 else devices[::-1])]
    return out


def aggregate(runs: dict[tuple[int, int], dict[str, Any]], devices: list[int],
              rounds: int) -> list[dict[str, Any]]:
    """One row per (device count, model) from every round's child results.

    Args:
      runs: ``{(round, devices): child result}``.

    Returns:
      Rows with the median, min and max images/s over all timed samples of all rounds,
      the median compile time, and the speed-up over the fewest devices computed within
      each round (``speedup``: median over rounds; ``speedup_min`` / ``speedup_max``).
    """
    n0 = min(devices)
    rows = []
    for n in devices:
        for j, first in enumerate(runs[(0, n)]["rows"]):
            per_round = [runs[(r, n)]["rows"][j] for r in range(rounds)]
            samples = sorted(x for row in per_round for x in row["images_per_second_samples"])
            median = statistics.median(samples)
            speedups = sorted(row["images_per_second"] / runs[(r, n0)]["rows"][j]
                              ["images_per_second"] for r, row in enumerate(per_round))
            rows.append({
                **{k: first[k] for k in ("model", "registry_name", "attention_implementation",
                                         "devices", "global_batch", "params")},
                "rounds": rounds,
                "compile_seconds": round(statistics.median(
                    row["compile_seconds"] for row in per_round), 3),
                "step_ms": round(1000 * first["global_batch"] / median, 3),
                "images_per_second": round(median, 1),
                "images_per_second_min": round(samples[0], 1),
                "images_per_second_max": round(samples[-1], 1),
                "speedup": round(statistics.median(speedups), 3),
                "speedup_min": round(speedups[0], 3),
                "speedup_max": round(speedups[-1], 3),
                "scaling_efficiency": round(statistics.median(speedups) * n0 / n, 3),
                "scaling": "strong (fixed global batch)",
            })
    for r in rows:
        first = next(x for x in rows if x["devices"] == r["devices"])
        r["vs_first_model"] = round(r["images_per_second"] / first["images_per_second"], 3)
        r["compile_vs_first_model"] = round(r["compile_seconds"] / first["compile_seconds"], 3)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every round's children, prints the table, writes the report; returns it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    devices = list(dict.fromkeys(args.devices))
    runs = {}
    for r, n in round_order(devices, args.rounds):
        print(f"round {r + 1}/{args.rounds}: {n} device(s)", file=sys.stderr, flush=True)
        runs[(r, n)] = run_child(args, n, argv)
    rows = aggregate(runs, devices, args.rounds)
    info = runs[(0, devices[0])]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = ("| model | devices | global batch | params | compile s | step ms "
              "| images/s (median) | min | max | vs first model | compile vs first "
              "| speed-up (median) | min | max | strong-scaling efficiency |\n"
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    print(f"backend {info['backend']} ({info['device_kind']}), jax {info['jax']}, "
          f"{os.cpu_count()} CPUs, load {load:.1f} at the end, image {args.image}, "
          f"{args.dtype}, global batch {args.batch} (strong scaling); {args.rounds} rounds "
          f"alternating the device counts, each {args.repeats} x {args.steps} steps per model")
    print(header)
    for r in rows:
        print(f"| {r['model']} | {r['devices']} | {r['global_batch']} | {r['params']:,} | "
              f"{r['compile_seconds']:.1f} | {r['step_ms']:.1f} | {r['images_per_second']:,.0f} "
              f"| {r['images_per_second_min']:,.0f} | {r['images_per_second_max']:,.0f} "
              f"| {r['vs_first_model']:.2f} | {r['compile_vs_first_model']:.2f} "
              f"| {r['speedup']:.2f} | {r['speedup_min']:.2f} | {r['speedup_max']:.2f} "
              f"| {r['scaling_efficiency']:.2f} |")
    report = {"rows": rows, "backend": info["backend"], "device_kind": info["device_kind"],
              "jax": info["jax"], "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "load_average_end": load, "scaling": "strong (fixed global batch)",
              "args": {k: v for k, v in vars(args).items() if k not in ("child", "shape")}}
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, OUT_FILE)
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
