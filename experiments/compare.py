r"""Ablation: does cosine attention help a CNN? Trains a list of configs for several seeds.

Usage::

    python experiments/compare.py                                  # 5 models x 3 seeds, digits
    python experiments/compare.py --seeds=1 --steps=200 --out=runs/compare_quick
    python experiments/compare.py --row=cnn --row=attention_local \
        --row='wide=experiments/configs/digits.py+model_kwargs.window=(5,5)' --dataset=mnist
    python experiments/compare.py --config=experiments/configs/cluttered.py \
        --out=runs/compare_cluttered                    # the presets on cluttered MNIST
    python experiments/compare.py --row=cnn --row=attention_local \
        --config.learning_rate=0.005 --config.data.batch_size=32   # for every row

Every row (``--row``, repeatable) is ``[LABEL=]SOURCE[+KEY=VALUE...]``: SOURCE is a preset
name (below) or a config file (``path.py`` or ``path.py:arg``, as ``--config`` of
``attnflax.main``), and each ``+KEY=VALUE`` overrides one config key of that row (values
are Python literals, else strings; new keys are allowed under ``model_kwargs`` only;
``+model_kwargs={...}`` replaces all of the model's arguments). Presets, all built on
``experiments/configs/digits.py`` so that data, batch size, augmentation, optimiser,
schedule and epochs are identical and only the model differs:

==================  ===========================================================
cnn                 the plain CNN (``digits_cnn.py``)
attention_local     the small CNN + one residual 3x3 local cosine-attention block
attention_global    the same block with global attention over the 8x8 map
resnet20            CIFAR-style ResNet-20 (16/32/64 channels at 8/4/2 pixels), no attention
resnet20_attention  ResNet-20 + a residual 3x3 local attention block (4 heads) after
                    stages 2 and 3 (4x4 and 2x2 maps)
==================  ===========================================================

``--config=FILE.py`` builds the presets on another config file instead: preset ``NAME``
becomes ``FILE.py:NAME``, so the file's ``get_config(NAME)`` defines that model and every
row shares the file's recipe (``experiments/configs/mnist5k.py`` and ``cluttered.py``
take the five preset names; there the attention stages of ``resnet20_attention`` are
global, after stages 2 and 3). ``--config.<key>=<value>`` overrides apply to every row
alike, after the row's own (typed by ``--config``'s ``get_config()``, digits.py by
default, exactly as ``attnflax.main`` types them); so do ``--steps`` (for
``--config.num_train_steps``) and ``--dataset`` (``--config.data.dataset``).

Each (row, seed) trains with ``attnflax.train.train_and_evaluate`` into
``OUT/runs/<label>/seed<k>`` (``config.seed = data.seed = k``). **Resumable:** a run whose
``results.json`` holds the same config is not run again, and an interrupted one resumes
from its checkpoint, so re-running the command finishes what is missing.

Writes ``OUT/comparison.md`` and ``OUT/comparison.json`` (``--out``, a folder): test
accuracy mean ± sample std over seeds, the difference to the first row (± its standard
error, and the p-value of Welch's t-test over the seeds), parameters,
multiply-adds per image (half the flops of XLA's cost analysis of the jitted eval
forward, batch 1), train images/s and wall time per run. Rows whose configs differ in
anything but the model are flagged (an unfair comparison).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from attnflax import cli  # noqa: E402
from attnflax.report import markdown_table, write_json  # noqa: E402

# Imported at their first use, after the flags are parsed.
jax = cli.lazy_import("jax")
jnp = cli.lazy_import("jax.numpy")
compilation_cache = cli.lazy_import("jax.experimental.compilation_cache.compilation_cache")
data = cli.lazy_import("attnflax.data")
models = cli.lazy_import("attnflax.models")
metrics = cli.lazy_import("attnflax.metrics")
train = cli.lazy_import("attnflax.train")

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "configs" / "digits.py")
PRESETS: dict[str, str] = {
    "cnn": f"{DIGITS}:cnn",
    "attention_local": DIGITS,
    "attention_global": f"{DIGITS}+model_kwargs.attention='global'",
    "resnet20": f"{DIGITS}:cnn+model='resnet20'+model_kwargs={{}}",
    "resnet20_attention": (
        f"{DIGITS}:cnn+model='resnet20'+model_kwargs={{'stage_attention': "
        "('none','block','block'),'attention':'local','window':(3,3),'num_heads':4}"
    ),
}
DEFAULT_ROWS = tuple(PRESETS)
# Config keys a comparison may vary between rows (everything else must match).
MODEL_KEYS = ("model", "model_kwargs", "seed", "data.seed")


# --------------------------------------------------------------------------- #
# Row specs and configs.                                                      #
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: a label, a config source and overrides ``[(dotted key, value), ...]``."""

    label: str
    path: str
    arg: str | None
    overrides: tuple[tuple[str, Any], ...]


def parse_row(spec: str, base: str | None = None) -> RowSpec:
    """Parses ``[LABEL=]SOURCE[+KEY=VALUE...]`` (SOURCE a preset or ``path[:arg]``).

    With `base` (a config file other than digits.py), preset ``NAME`` means ``base:NAME``.

    Raises:
      ValueError: On an empty spec, an override without ``=``, or a config file that
        does not exist (the presets are listed).
    """
    head, *parts = spec.split("+")
    label = None
    if "=" in head:
        label, head = head.split("=", 1)
    if head in PRESETS and base is not None:
        if not os.path.isfile(base):
            raise ValueError(f"--config {base!r} is not a config file.")
        return RowSpec(label or head, base, head, _parse_overrides(parts, spec))
    if head in PRESETS:
        preset = parse_row(PRESETS[head])
        return RowSpec(label or head, preset.path, preset.arg,
                       preset.overrides + _parse_overrides(parts, spec))
    path, _, arg = head.partition(":") if not os.path.exists(head) else (head, "", "")
    if not path:
        raise ValueError(f"empty config in row {spec!r}.")
    if not os.path.isfile(path):
        raise ValueError(
            f"row {spec!r}: {path!r} is neither a preset ({', '.join(PRESETS)}) nor a config "
            "file."
        )
    overrides = _parse_overrides(parts, spec)
    if label is None:
        label = pathlib.Path(path).stem + (f"_{arg}" if arg else "")
        label += "".join(f"_{k.split('.')[-1]}={_short(v)}" for k, v in overrides)
    return RowSpec(label, path, arg or None, overrides)


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def _parse_overrides(parts: Sequence[str], spec: str) -> tuple[tuple[str, Any], ...]:
    out = []
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"row {spec!r}: override {part!r} is not KEY=VALUE.")
        out.append((key.strip(), cli.parse_value(value)))
    return tuple(out)


def build_config(
    row: RowSpec, seed: int, common: Sequence[tuple[str, Any]] = ()
) -> ml_collections.ConfigDict:
    """The config of one (row, seed): file, row overrides, shared overrides, seeds.

    Raises:
      ValueError: An unknown key or a value of the wrong type (`attnflax.cli.override`).
    """
    config = cli.load_config_file(row.path + (f":{row.arg}" if row.arg else ""))
    for key, value in (*row.overrides, *common):
        cli.override(config, key, value)
    config.seed = seed
    config.data.seed = seed
    return config


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as the plain JSON that ``results.json`` stores."""
    return json.loads(config.to_json_best_effort())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def budget_differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keys outside `MODEL_KEYS` whose values differ between rows: ``{key: {label: value}}``."""
    flat = {label: _flatten(c) for label, c in configs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values()))) if flat else []
    out = {}
    for key in keys:
        if any(key == m or key.startswith(m + ".") for m in MODEL_KEYS):
            continue
        values = {label: f.get(key) for label, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


# --------------------------------------------------------------------------- #
# Measurements and aggregation.                                               #
# --------------------------------------------------------------------------- #


def cached_multiply_adds(config: ml_collections.ConfigDict, path: str) -> float:
    """Multiply-adds per image of the model `config` trains, remembered in the JSON file
    `path` next to the row's runs.

    The figure is `attnflax.models.multiply_adds` (half the flops XLA estimates for the
    jitted eval forward, from shapes only). The cache holds the config it was computed for
    and is used only for the same config.
    """
    wanted = config_json(config)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("config") == wanted:
            return float(cached["multiply_adds"])
    info = data.get_dataset_info(config.data)
    model = train.create_model(config, info.num_classes)
    macs = models.multiply_adds(model, jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {"config": wanted, "multiply_adds": macs})
    return macs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Adds ``delta_vs_first``, ``delta_se`` and ``welch_p`` to each row (vs the first)."""
    base = rows[0]
    for r in rows:
        r["delta_vs_first"], r["delta_se"] = difference(r, base)
        r["welch_p"] = welch_p(r["test_accuracy"], base["test_accuracy"])


def summarize(label: str, runs: Sequence[dict[str, Any]], macs: float) -> dict[str, Any]:
    """One table row from the results of a row's seeds."""
    acc_mean, acc_std = mean_std([r["test_accuracy"] for r in runs])
    ips = [r["train_images_per_second"] for r in runs if r.get("train_images_per_second")]
    return {
        "label": label,
        "model": runs[0]["config"]["model"],
        "model_kwargs": runs[0]["config"].get("model_kwargs", {}),
        "seeds": [r["config"]["seed"] for r in runs],
        "test_accuracy": [r["test_accuracy"] for r in runs],
        "test_accuracy_mean": acc_mean,
        "test_accuracy_std": acc_std,
        "params": runs[0]["params"],
        "multiply_adds": macs,
        "train_images_per_second": float(np.mean(ips)) if ips else None,
        "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in runs])),
        "train_steps": runs[0]["train_steps"],
        "test_examples": runs[0]["test_examples"],
    }


def difference(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """Mean accuracy difference to `base` and its standard error (NaN if unknown)."""
    se2 = 0.0
    for r in (row, base):
        n = len(r["test_accuracy"])
        se2 += (r["test_accuracy_std"] ** 2 / n) if n > 1 else float("nan")
    return row["test_accuracy_mean"] - base["test_accuracy_mean"], math.sqrt(se2)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test for equal means (NaN if undefined)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdict(row: dict[str, Any], base: dict[str, Any], alpha: float = 0.05) -> str:
    """One sentence: does `row` differ from `base` (Welch's t-test at level `alpha`)?"""
    delta, se = difference(row, base)
    p = welch_p(row["test_accuracy"], base["test_accuracy"])
    pp = f"{100 * delta:+.2f}" + (f" ± {100 * se:.2f}" if math.isfinite(se) else "") + " pp"
    if not math.isfinite(p):
        judgement = "one seed only: no error bar, no conclusion"
    elif p >= alpha:
        judgement = f"p = {p:.2f}: no significant difference"
    else:
        judgement = f"p = {p:.3f}: significantly {'better' if delta > 0 else 'worse'}"
    return f"{row['label']} vs {base['label']}: {pp} ({judgement})."


def runs_of(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Every run's accuracy, over all rows."""
    return [a for r in rows for a in r["test_accuracy"]]


def _delta_cell(row: dict[str, Any], base: dict[str, Any]) -> str:
    delta, se = difference(row, base)
    p = welch_p(row["test_accuracy"], base["test_accuracy"])
    if not math.isfinite(se):
        return f"{100 * delta:+.2f}"
    return f"{100 * delta:+.2f} (± {100 * se:.2f}, p={p:.2f})"


def _pct(mean: float, std: float) -> str:
    s = f"{100 * mean:.2f}"
    return s + (f" ± {100 * std:.2f}" if math.isfinite(std) else "")


def markdown(rows: Sequence[dict[str, Any]], settings: dict[str, Any],
             differences: dict[str, Any]) -> str:
    """The ``comparison.md`` text: table, verdicts against the first row, notes."""
    base = rows[0]
    table = markdown_table(
        ["model", "test acc % (mean ± std)", f"Δ vs {base['label']} pp (± SE, p)", "params",
         "M mult-adds", "train img/s", "wall s/run", "seeds"],
        [
            [
                r["label"],
                _pct(r["test_accuracy_mean"], r["test_accuracy_std"]),
                "—" if r is base else _delta_cell(r, base),
                f"{r['params']:,}",
                f"{r['multiply_adds'] / 1e6:.2f}",
                f"{r['train_images_per_second']:.0f}" if r["train_images_per_second"] else "—",
                f"{r['wall_seconds_mean']:.1f}",
                len(r["seeds"]),
            ]
            for r in rows
        ],
    )
    lines = [
        "# Comparison",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"Dataset `{settings['dataset']}` ({rows[0]['test_examples']} test examples), "
        f"{rows[0]['train_steps']} train steps per run, seeds {settings['seeds']}, "
        f"{settings['devices']} device(s): {settings['device_kind']}; the {len(runs_of(rows))} "
        f"runs took {settings['sum_of_run_wall_seconds'] / 60:.1f} min (sum of their wall "
        "times).",
        "",
        table,
        "",
        *[f"- {verdict(r, base)}" for r in rows[1:]],
        "",
        "Accuracy: mean ± sample std over seeds (seed sets `config.seed` and `data.seed`). "
        "Δ: difference of means to the first row ± its standard error; p: two-sided "
        "Welch's t-test over the seeds (significant: p < 0.05). One test example is "
        f"{100 / rows[0]['test_examples']:.2f} pp. "
        "Multiply-adds per image from XLA's cost analysis of the eval forward. "
        "Images/s: training throughput after compilation; wall: whole run incl. compile "
        "and evaluation.",
    ]
    if differences:
        lines += ["", "**Warning: the rows differ in more than the model** (unfair budget):"]
        lines += [f"- `{k}`: {v}" for k, v in differences.items()]
    else:
        lines += ["", "All rows share data, augmentation, batch size, optimiser, schedule "
                      "and steps; only the model differs."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# The driver.                                                                 #
# --------------------------------------------------------------------------- #


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(keys whose values differ or that were removed, keys only in new)``, dotted."""
    a, b = _flatten(old), _flatten(new)
    differ = sorted(k for k in a if k not in b or a[k] != b[k])
    return differ, sorted(set(b) - set(a))


def run_or_load(
    config: ml_collections.ConfigDict,
    workdir: str,
    trainer: Callable[[ml_collections.ConfigDict, str], dict[str, Any]],
) -> tuple[dict[str, Any], bool]:
    """The results of `config` in `workdir`: read if finished with this config, else trained.

    Returns:
      ``(results, ran)``.

    A finished run counts as the same config when every key it recorded has the wanted
    value; keys the code added since (new config options, at their defaults) are
    reported but do not force a re-run.

    Raises:
      ValueError: If `workdir` holds finished results of a different config.
    """
    path = os.path.join(workdir, metrics.RESULTS_FILE)
    wanted = config_json(config)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        differ, added = config_changes(results.get("config", {}), wanted)
        if not differ:
            if added:
                print(f"note: {workdir} finished before the config gained {added}; reused.")
            return results, False
        raise ValueError(
            f"{workdir} holds finished results of a different config (keys {differ[:8]} "
            "differ). Use another --out, or delete that run to retrain it."
        )
    results = trainer(config, workdir)
    if results.get("interrupted"):
        raise KeyboardInterrupt(f"training of {workdir} was interrupted; run again to resume.")
    return results, True


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags (``--config`` and its overrides come from `attnflax.cli`)."""
    flags.DEFINE_multi_string("row", list(DEFAULT_ROWS), "A row: a preset "
                              f"({', '.join(DEFAULT_ROWS)}) or [LABEL=]path.py[:arg][+KEY=VALUE]"
                              " (repeat the flag for several rows)", flag_values=flag_values)
    flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 per row.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("steps", None, "Train steps for every row (default: the config's "
                         "training length).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_string("dataset", None, "data.dataset for every row.", flag_values=flag_values)
    cli.define_out_flag(flag_values, "comparison.md, comparison.json and runs/<label>/seed<k>",
                        default="runs/compare")
    flags.DEFINE_string("jax_cache", None, "Persistent XLA compilation cache, so seeds after "
                        "the first reuse the compiled train and eval steps (default "
                        "OUT/jax_cache; '' = off; ignored if JAX already has one).",
                        flag_values=flag_values)


def parse_args(argv: Sequence[str] | None) -> Any:
    """The flags; ``base`` is the ``--config`` file the presets are built on (None:
    digits.py, whose presets are the `PRESETS` table) and ``common`` the ``(key, value)``
    overrides of every row (``--config.<key>``, ``--steps``, ``--dataset``)."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="compare.py",
                                 config=True, config_default=DIGITS)
    base = args.config_file.partition(":")[0]
    same = os.path.isfile(base) and os.path.samefile(base, DIGITS)
    args.base = None if same else base
    args.common = list(args.config_overrides.items())
    if args.steps is not None:
        args.common.append(("num_train_steps", args.steps))
    if args.dataset is not None:
        args.common.append(("data.dataset", args.dataset))
    return args


def row_configs(args: Any) -> tuple[list[RowSpec], dict[str, list[ml_collections.ConfigDict]]]:
    """Every row's spec and its config per seed, all built (and checked) before anything
    trains, so that an edit of a config file while the comparison runs cannot mix budgets.

    Raises:
      SystemExit: A bad row, an unknown key, a duplicate label: a usage error (one
        ``error:`` line, status 2), like every bad command line.
    """
    try:
        rows = [parse_row(s, args.base) for s in args.row]
    except ValueError as e:
        cli.usage_error("compare.py", str(e))
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        cli.usage_error("compare.py", f"duplicate row labels {labels}; name rows LABEL=...")
    configs = {}
    for row in rows:
        try:
            configs[row.label] = [build_config(row, seed, args.common)
                                  for seed in range(args.seeds)]
        except ValueError as e:
            cli.usage_error("compare.py", f"in row {row.label!r}: {e}")
    return rows, configs


def main(
    argv: Sequence[str] | None = None,
    trainer: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Runs the comparison; returns the ``comparison.json`` content.

    Args:
      argv: Command-line arguments (without the program name); None reads ``sys.argv``.
      trainer: ``train_and_evaluate``-like function (tests may wrap it).
    """
    args = parse_args(argv)
    trainer = trainer or train.train_and_evaluate
    rows, all_configs = row_configs(args)
    seeds = list(range(args.seeds))
    os.makedirs(args.out, exist_ok=True)
    configs, macs = {}, {}
    for row in rows:
        configs[row.label] = config_json(all_configs[row.label][0])
        try:
            macs[row.label] = cached_multiply_adds(
                all_configs[row.label][0],
                os.path.join(args.out, "runs", row.label, "multiply_adds.json"))
        except (ValueError, data.DataError) as e:
            raise SystemExit(f"compare.py: error in row {row.label!r}: {e}") from None

    cache = os.path.join(args.out, "jax_cache") if args.jax_cache is None else args.jax_cache
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
        compilation_cache.reset_cache()  # use it even if this process compiled before

    summaries, runs = [], []
    start = time.perf_counter()
    for row in rows:
        results = []
        for seed, config in zip(seeds, all_configs[row.label], strict=True):
            workdir = os.path.join(args.out, "runs", row.label, f"seed{seed}")
            try:
                result, ran = run_or_load(config, workdir, trainer)
            except (ValueError, train.ConfigError) as e:
                raise SystemExit(f"compare.py: error in {workdir}: {e}") from None
            status = "trained" if ran else "finished before: skipped"
            print(f"[{row.label} seed {seed}] {status}: test accuracy "
                  f"{100 * result['test_accuracy']:.2f}% ({workdir})", flush=True)
            results.append(result)
            runs.append({"label": row.label, "seed": seed, "workdir": workdir, "ran": ran,
                         **{k: result.get(k) for k in (
                             "test_accuracy", "test_loss", "test_examples", "train_steps",
                             "train_images_per_second", "wall_seconds", "params")}})
        summaries.append(summarize(row.label, results, macs[row.label]))

    differences = budget_differences(configs)
    add_comparisons(summaries)
    settings = {
        "command": "python experiments/compare.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "rows": {r.label: dataclasses.asdict(r) for r in rows},
        "seeds": seeds,
        "steps": args.steps,
        "dataset": configs[rows[0].label]["data"]["dataset"],
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "seconds_this_call": time.perf_counter() - start,
        "sum_of_run_wall_seconds": float(sum(r["wall_seconds"] for r in runs)),
    }
    out = {"rows": summaries, "runs": runs, "settings": settings,
           "budget_differences": differences}
    text = markdown(summaries, settings, differences)
    write_json(os.path.join(args.out, "comparison.json"), out)
    with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"Wrote {os.path.join(args.out, 'comparison.md')} and comparison.json "
          f"({settings['seconds_this_call']:.0f} s).")
    return out


if __name__ == "__main__":
    main()
