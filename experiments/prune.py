r"""Global LAMP-score pruning (default; or plain |w| magnitude) and masked fine-tuning.

Usage::

    python experiments/prune.py --workdir=runs/digits
    python experiments/prune.py --workdir=runs/digits --sparsities=80,90,95,98
    python experiments/prune.py --workdir=runs/digits --criterion=magnitude --schedule=oneshot

For every sparsity (percent of all ``kernel`` weights, default ``--sparsities=0,50,70,90,95``):

1. **prune**: zero the lowest-ranked fraction of all kernel weights together
   (`attnflax.analysis.prune.magnitude_masks`: one global ranking over every kernel, exact count;
   biases, norms, attention scales and position biases are kept). ``--criterion``:

   * ``lamp`` (default): rank LAMP scores (Lee et al., ICLR 2021), i.e. magnitudes
     normalised within each tensor, ``w_u^2 / sum of w_v^2 over the tensor's weights at
     least as large``; still one global threshold, but no layer is emptied first;
   * ``magnitude``: rank ``|w|`` itself (plain global magnitude pruning). On the digits
     attention CNN this removes 99 % of the large dense layer and all of the attention
     output projection at 90 % sparsity, and the whole dense layer at 95 % (see the
     README for the numbers);

   ``--schedule``: ``iterative`` (default) walks the sparsities in increasing order,
   each pruning the previous fine-tuned model further (already-pruned weights stay
   pruned: the masks nest); ``oneshot`` starts every sparsity from the trained model;
2. **evaluate** the pruned model (no retraining) on the eval split;
3. **fine-tune** ``--finetune_steps`` steps with the masks fixed (gradients and updates
   masked, weights re-zeroed after every step) on the train split with its augmentation,
   the training run's optimiser, weight decay, clipping and label smoothing, and a cosine
   decay from ``--finetune_lr`` (default: a tenth of the run's peak rate) to 0; BatchNorm
   statistics keep updating. Sparsity 0 gets the same fine-tune, a control for the
   effect of the extra training alone;
4. **evaluate** again and **save** the fine-tuned params with ``np.savez_compressed``
   (zip/deflate of the dense float32 arrays, zeros included: the simplest portable
   format; the zeros are what compresses) as ``<out>/params_sparsity<s>.npz``.

Writes ``prune.md``, ``prune.json`` and ``prune.png`` (accuracy and file size vs sparsity)
into ``--out`` (a folder, default ``<workdir>/prune``). The model is the workdir's latest
checkpoint (``--best``, ``--step``: `attnflax.restore`'s rule); accuracies are the
trainer's masked evaluation (`attnflax.restore.evaluate`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from attnflax import cli  # noqa: E402
from attnflax.report import markdown_table, write_json  # noqa: E402

# Imported at their first use, after the flags are parsed.
jax = cli.lazy_import("jax")
data = cli.lazy_import("attnflax.data")
prune = cli.lazy_import("attnflax.analysis.prune")
restore = cli.lazy_import("attnflax.restore")
parallel = cli.lazy_import("attnflax.parallel")
train = cli.lazy_import("attnflax.train")
viz = cli.lazy_import("attnflax.viz")

DEFAULT_SPARSITIES = (0.0, 50.0, 70.0, 90.0, 95.0)
DEFAULT_CRITERION = "lamp"  # the first line of the docstring (the --help description) names it


def check_percent(value: float) -> float:
    """A sparsity in percent, checked to lie in ``[0, 100)``."""
    if not 0 <= value < 100:
        raise ValueError(
            f"sparsity must be a percentage in [0, 100) (e.g. 90); got {value:g}."
        )
    return value


def _percent_problem(value: float) -> str | None:
    try:
        check_percent(value)
    except ValueError as e:
        return str(e)
    return None


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_checkpoint_flags(flag_values)
    cli.define_list("sparsities", DEFAULT_SPARSITIES, "Sparsities in percent of all kernel "
                    "weights.", flag_values, item=float, check=_percent_problem)
    flags.DEFINE_string("criterion", DEFAULT_CRITERION, "Global ranking of |w| ('magnitude') "
                        "or of LAMP scores ('lamp', magnitudes normalised per tensor).",
                        flag_values=flag_values)
    flags.DEFINE_enum("schedule", "iterative", ["oneshot", "iterative"], "oneshot: every "
                      "sparsity from the trained model; iterative: in increasing order, each "
                      "from the previous fine-tuned one.", flag_values=flag_values)
    flags.DEFINE_integer("finetune_steps", 300, "Masked fine-tune steps per sparsity "
                         "(0 = none).", lower_bound=0, flag_values=flag_values)
    flags.DEFINE_float("finetune_lr", None, "Peak fine-tune learning rate (default: the run's "
                       "peak / 10).", flag_values=flag_values)
    flags.register_validator("finetune_lr", lambda v: v is None or v > 0,
                             "--finetune_lr must be > 0.", flag_values=flag_values)
    cli.define_out_flag(flag_values, "prune.md, prune.json, prune.png and the pruned "
                        "params_sparsity<s>.npz", default_text="<workdir>/prune")


def parse_args(argv: Sequence[str] | None) -> Any:
    """The flags (a bad one is a one-line usage error)."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="prune.py")
    if args.criterion not in prune.CRITERIA:
        cli.usage_error("prune.py", f"--criterion={args.criterion}: must be one of "
                                    f"{', '.join(prune.CRITERIA)}.")
    return args


def finetune_optimizer(config: Any, steps: int, lr: float) -> Any:
    """The run's optimiser recipe with a cosine decay from `lr` over `steps`, no warm-up."""
    ft = config.copy_and_resolve_references()
    ft.learning_rate = lr
    ft.end_learning_rate_factor = 0.0
    tx, _ = train.create_optimizer(ft, total_steps=max(steps, 1), warmup_steps=0)
    return tx


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prunes at every sparsity; returns the ``prune.json`` content."""
    args = parse_args(argv)
    try:
        trained = restore.load_trained(args.workdir, args.step, best=args.best)
    except restore.CheckpointNotFoundError as e:
        raise SystemExit(f"prune.py: error: {e}") from None
    config = trained.config
    out = args.out or os.path.join(args.workdir, "prune")
    os.makedirs(out, exist_ok=True)
    eval_batches = data.create_eval_iterator(config.data, num_devices=trained.mesh.size)
    lr = args.finetune_lr or config.learning_rate / 10
    params = trained.variables["params"]
    base = restore.evaluate(trained, eval_batches)
    base_acc, examples = base["accuracy"], base["examples"]
    print(f"{trained.label}: {prune.sparsity_report(params).total:,} kernel weights, "
          f"accuracy {100 * base_acc:.2f}% on {examples} eval examples")

    tx = finetune_optimizer(config, args.finetune_steps, lr)
    mesh = parallel.create_mesh()
    step = prune.make_finetune_step(trained.model, tx, mesh=mesh,
                                    label_smoothing=config.label_smoothing)
    rows = []
    current = trained.variables
    sparsities = sorted(args.sparsities) if args.schedule == "iterative" else args.sparsities
    for percent in sparsities:
        start = time.perf_counter()
        if args.schedule == "oneshot":
            current = trained.variables
        masks = prune.magnitude_masks(current["params"], percent / 100, args.criterion)
        pruned = {**current, "params": prune.apply_masks(current["params"], masks)}
        acc_pruned = restore.evaluate(trained, eval_batches, variables=pruned)["accuracy"]
        tuned, losses = pruned, []
        if args.finetune_steps:
            batches = data.create_train_iterator(config.data, num_devices=mesh.size)
            tuned, losses = prune.masked_finetune(
                trained.model, pruned, masks, batches, tx, args.finetune_steps,
                seed=config.seed, step=step, mesh=mesh)
        acc_tuned = restore.evaluate(trained, eval_batches, variables=tuned)["accuracy"]
        current = tuned
        report = prune.sparsity_report(tuned["params"])
        path = os.path.join(out, f"params_sparsity{percent:g}.npz")
        prune.save_compressed(path, jax.device_get(tuned["params"]))
        row = {
            "sparsity_requested": percent,
            "sparsity_achieved": 100 * report.sparsity,
            "zero_weights": report.zeros,
            "kernel_weights": report.total,
            "per_tensor_sparsity": {k: z / n for k, (z, n) in report.per_tensor.items()},
            "accuracy_pruned": acc_pruned,
            "accuracy_finetuned": acc_tuned,
            "finetune_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "npz_bytes": os.path.getsize(path),
            "dense_bytes": prune.dense_size(tuned["params"]),
            "npz_path": path,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(f"  sparsity {percent:g}%: achieved {row['sparsity_achieved']:.2f}%, accuracy "
              f"pruned {100 * acc_pruned:.2f}% -> fine-tuned {100 * acc_tuned:.2f}%, "
              f"{row['npz_bytes'] / 1024:.1f} KiB", flush=True)

    table = markdown_table(
        ["sparsity %", "achieved %", "acc pruned %", "acc fine-tuned %", "npz KiB",
         "vs dense"],
        [[f"{r['sparsity_requested']:g}", f"{r['sparsity_achieved']:.2f}",
          f"{100 * r['accuracy_pruned']:.2f}", f"{100 * r['accuracy_finetuned']:.2f}",
          f"{r['npz_bytes'] / 1024:.1f}", f"{r['npz_bytes'] / r['dense_bytes']:.2f}"]
         for r in rows])
    text = (f"# Pruning {trained.label}\n\nUnpruned accuracy {100 * base_acc:.2f}% "
            f"({examples} examples); global `{args.criterion}` ranking, {args.schedule} "
            f"schedule, {args.finetune_steps} masked fine-tune steps per "
            f"sparsity from lr {lr:g}. Size: `np.savez_compressed` of all params "
            f"(dense {rows[0]['dense_bytes'] / 1024:.1f} KiB uncompressed).\n\n{table}\n")
    fig, axes = viz.subplots(ncols=2, size=(4.5, 3.5))
    axes = axes[0]
    xs = [r["sparsity_requested"] for r in rows]
    viz.line_plot({"pruned": (xs, [100 * r["accuracy_pruned"] for r in rows]),
                   "pruned + fine-tuned": (xs, [100 * r["accuracy_finetuned"] for r in rows])},
                  xlabel="sparsity of kernels (%)", ylabel="test accuracy (%)",
                  title=trained.label, ax=axes[0])
    viz.line_plot({"npz_compressed": (xs, [r["npz_bytes"] / 1024 for r in rows])},
                  xlabel="sparsity of kernels (%)", ylabel="checkpoint on disk (KiB)",
                  title="compressed size", ax=axes[1])
    png = os.path.join(out, "prune.png")
    fig.savefig(png, dpi=110)
    viz.close(fig)
    result = {"workdir": args.workdir, "model": trained.label, "step": trained.step,
              "base_accuracy": base_acc, "eval_examples": examples,
              "criterion": args.criterion, "schedule": args.schedule,
              "finetune_steps": args.finetune_steps, "finetune_lr": lr,
              "size_format": "np.savez_compressed of all params (dense float32, zip/deflate)",
              "rows": rows, "png": png}
    write_json(os.path.join(out, "prune.json"), result)
    with open(os.path.join(out, "prune.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"Wrote {out}/prune.md, prune.json, prune.png")
    return result


if __name__ == "__main__":
    main()
