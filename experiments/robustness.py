r"""Accuracy under input corruptions and adversarial attacks, for one or several models.

Usage::

    python experiments/robustness.py --workdir=runs/digits
    python experiments/robustness.py --workdir runs/compare/runs/cnn/seed0 \
        runs/compare/runs/attention_local/seed0 --out=runs/robustness
    python experiments/robustness.py --workdir=runs/digits --eps 0 4/255 8/255 --attacks pgd \
        --pgd_steps=20 --noise none --blur --contrast 0.2  # none / empty list: skip it

Everything happens in **pixel space** ``x`` in ``[0, 1]`` (`attnflax.robustness`): each
eval image is mapped back from the pipeline's normalisation, corrupted or attacked, and
normalised again inside the model call. So

* Gaussian noise ``--noise`` σ and blur ``--blur`` σ (pixels) and ``--contrast`` factors
  act on real pixel values (results clipped to ``[0, 1]``);
* an attack's ε is an L∞ budget in ``[0, 1]`` pixel units whatever the dataset's std:
  ``8/255`` changes no pixel by more than 8 grey levels. FGSM takes one signed-gradient
  step of size ε; PGD takes ``--pgd_steps`` steps of ``2.5 ε / steps`` from a random
  start in the ball, projecting onto the ball and ``[0, 1]`` after each. Both ascend the
  cross-entropy of the true label (white-box, untargeted).

"clean" is the accuracy on the same round-tripped pixels; ε = 0 reproduces it exactly.
Writes ``robustness.md``, ``robustness.json`` and ``robustness.png`` (accuracy vs ε per
attack, and per corruption) into ``--out`` (default ``<workdir>/robustness`` for one
model, ``runs/robustness`` for several).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attnflax import data, restore, viz  # noqa: E402
from attnflax import robustness as rb  # noqa: E402
from attnflax.report import markdown_table, write_json  # noqa: E402

DEFAULT_EPS = ("0", "2/255", "4/255", "8/255", "16/255", "32/255")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="robustness.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", nargs="+", required=True, help="training workdir(s)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--eps", nargs="+", default=list(DEFAULT_EPS),
                        help="L-inf budgets in [0, 1] pixel units, e.g. 0.03 or 8/255 "
                             "(default %(default)s)")
    parser.add_argument("--attacks", nargs="*", default=list(rb.ATTACKS),
                        choices=(*rb.ATTACKS, "none"),
                        help="attacks (default fgsm pgd; 'none' or a bare --attacks: none)")
    parser.add_argument("--pgd_steps", type=int, default=10, help="PGD steps (default 10)")
    for name, flag in (("gaussian_noise", "noise"), ("gaussian_blur", "blur"),
                       ("contrast", "contrast")):
        parser.add_argument(f"--{flag}", nargs="*", type=_level,
                            default=list(rb.DEFAULT_CORRUPTION_LEVELS[name]),
                            help=f"{name} levels (default %(default)s; '--{flag} none' or "
                                 f"a bare --{flag}: skip it)")
    parser.add_argument("--num_examples", type=int, default=None,
                        help="evaluate the first N eval examples only (default all)")
    parser.add_argument("--seed", type=int, default=0, help="noise and PGD start seed")
    parser.add_argument("--out", default=None, help="output dir")
    args = parser.parse_args(argv)
    for name in ("noise", "blur", "contrast"):
        levels = getattr(args, name)
        if None in levels and len(levels) > 1:
            parser.error(f"--{name} none cannot be combined with levels; got {levels}.")
        setattr(args, name, [lv for lv in levels if lv is not None])
    if "none" in args.attacks and len(args.attacks) > 1:
        parser.error(f"--attacks none cannot be combined with attacks; got {args.attacks}.")
    args.attacks = [a for a in args.attacks if a != "none"]
    try:
        args.eps_values = [rb.parse_epsilon(e) for e in args.eps]
        for name in ("noise", "blur", "contrast"):
            for level in getattr(args, name):
                if not (np.isfinite(level) and level >= 0):
                    raise ValueError(f"--{name} levels must be >= 0; got {level:g}.")
    except ValueError as e:
        parser.error(str(e))
    if args.pgd_steps < 1:
        parser.error(f"--pgd_steps must be >= 1; got {args.pgd_steps}.")
    if args.num_examples is not None and args.num_examples < 1:
        parser.error(f"--num_examples must be >= 1; got {args.num_examples}.")
    return args


def _level(text: str) -> float | None:
    """A corruption level, or None for ``none`` (skip the corruption)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a level must be a number or 'none'; got {text!r}.") from None


def eps_label(text: str, value: float) -> str:
    return text if "/" not in text else f"{text} ({value:.3f})"


def conditions(args: argparse.Namespace) -> list[tuple[str, str, float, str]]:
    """``[(kind, name, level, label), ...]``: clean, the corruptions, the attacks."""
    out = [("clean", "clean", 0.0, "clean")]
    for flag, name, sym in (("noise", "gaussian_noise", "σ"), ("blur", "gaussian_blur", "σ"),
                            ("contrast", "contrast", "×")):
        out += [("corruption", name, level, f"{name} {sym}{level:g}")
                for level in getattr(args, flag)]
    for attack in args.attacks:
        out += [("attack", attack, value, f"{attack} ε={eps_label(text, value)}")
                for text, value in zip(args.eps, args.eps_values, strict=True)]
    return out


def evaluate_model(
    trained: restore.Trained, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], int]:
    """One model under every condition: ``({label: accuracy}, {label: max L∞ change},
    examples)``, each accuracy the trainer's masked evaluation of the perturbed batches."""
    batches = rb.limit_examples(
        data.create_eval_iterator(trained.config.data, num_devices=trained.mesh.size),
        args.num_examples)
    examples = int(sum(b["mask"].sum() for b in batches))
    loss_fn = rb.pixel_loss_fn(jax.jit(rb.pixel_logits_fn(
        trained.model.apply, trained.variables, trained.mean, trained.std)))
    key = jax.random.key(args.seed)
    results, linf = {}, {}
    for kind, name, level, label in conditions(args):
        if kind == "clean":
            perturb = None
        elif kind == "corruption":
            perturb = rb.corruption_perturb(name, level)
        else:
            perturb = rb.attack_perturb(loss_fn, name, level, pgd_steps=args.pgd_steps)
        stats: dict[str, float] = {}
        results[label] = restore.evaluate(trained, rb.perturbed_batches(
            batches, perturb, trained.mean, trained.std, key, stats))["accuracy"]
        linf[label] = stats["max_linf"]
    return results, linf, examples


def models_sentence(labels: Sequence[str], model_labels: Sequence[str]) -> str:
    """The markdown line naming the models: each column label, with the model it stands
    for where that says more (``attention_local/seed0``: attention_cnn (local) step 135)."""
    parts = [f"`{m}`" if m == t else f"`{m}`: {t}"
             for m, t in zip(labels, model_labels, strict=True)]
    return ("Model: " if len(parts) == 1 else "Models: ") + "; ".join(parts) + "."


def robustness_figure(labels: Sequence[str], accuracy: dict[str, dict[str, float]],
                      conds: Sequence[tuple[str, str, float, str]],
                      attacks: Sequence[str]) -> Any:
    """Accuracy vs ε per attack (left) and per corruption (right, bars), one series per
    model; the bar legend sits outside the axes, so it covers no bar."""
    fig, axes = viz.subplots(ncols=2, size=(5.5, 3.8))
    axes = axes[0]
    series = {}
    for m in labels:
        for attack in attacks:
            pts = [(c[2], 100 * accuracy[m][c[3]]) for c in conds if c[1] == attack]
            series[f"{attack}: {m}"] = ([p[0] for p in pts], [p[1] for p in pts])
    viz.line_plot(series, xlabel="ε (L∞, [0,1] pixel units)", ylabel="accuracy (%)",
                  title="adversarial attacks", ax=axes[0])
    corr = [c for c in conds if c[0] in ("clean", "corruption")]
    width = 0.8 / max(len(labels), 1)
    for j, m in enumerate(labels):
        axes[1].bar(np.arange(len(corr)) + j * width, [100 * accuracy[m][c[3]] for c in corr],
                    width, label=m)
    axes[1].set_xticks(np.arange(len(corr)) + 0.4 - width / 2)
    axes[1].set_xticklabels([c[3].replace("gaussian_", "") for c in corr], rotation=60,
                            fontsize=7, ha="right")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_title("corruptions")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                   borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _short_path(workdir: str) -> str:
    """The last two components of a workdir (``attention_local/seed0``)."""
    parts = os.path.normpath(workdir).split(os.sep)
    return "/".join(parts[-2:])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluates every model under every condition; returns the ``robustness.json`` content."""
    args = parse_args(argv)
    try:
        models = [restore.load_trained(w, args.step) for w in args.workdir]
    except restore.CheckpointNotFoundError as e:
        raise SystemExit(f"robustness.py: error: {e}") from None
    labels = [_short_path(t.workdir) if len(models) > 1 else t.label for t in models]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i}" for i, lab in enumerate(labels)]
    out = args.out or (os.path.join(args.workdir[0], "robustness") if len(models) == 1
                       else os.path.join("runs", "robustness"))
    os.makedirs(out, exist_ok=True)

    accuracy: dict[str, dict[str, float]] = {}
    max_linf: dict[str, dict[str, float]] = {}
    examples: dict[str, int] = {}
    for label, trained in zip(labels, models, strict=True):
        start = time.perf_counter()
        accuracy[label], max_linf[label], examples[label] = evaluate_model(trained, args)
        print(f"{label}: clean {100 * accuracy[label]['clean']:.2f}% on {examples[label]} "
              f"examples ({time.perf_counter() - start:.0f} s)", flush=True)

    conds = conditions(args)
    table = markdown_table(
        ["condition", *labels],
        [[c[3], *(f"{100 * accuracy[m][c[3]]:.2f}" for m in labels)] for c in conds])
    models_line = models_sentence(labels, [t.label for t in models])
    text = (f"# Robustness (accuracy %, {', '.join(str(examples[m]) for m in labels)} eval "
            f"examples)\n\n{models_line}\n\nε: L∞ in [0, 1] pixel units; PGD "
            f"{args.pgd_steps} steps with random start; noise/blur σ in pixel units; "
            "contrast factor around each image's mean.\n\n"
            f"{table}\n")

    fig = robustness_figure(labels, accuracy, conds, args.attacks)
    png = os.path.join(out, "robustness.png")
    fig.savefig(png, dpi=110)
    viz.close(fig)
    result = {
        "models": {m: {"workdir": t.workdir, "model": t.label, "step": t.step,
                       "examples": examples[m]}
                   for m, t in zip(labels, models, strict=True)},
        "conditions": [{"kind": k, "name": n, "level": lv, "label": lab}
                       for k, n, lv, lab in conds],
        "accuracy": accuracy,
        "max_linf_change": max_linf,
        "pgd_steps": args.pgd_steps,
        "seed": args.seed,
        "png": png,
    }
    write_json(os.path.join(out, "robustness.json"), result)
    with open(os.path.join(out, "robustness.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"Wrote {out}/robustness.md, robustness.json, robustness.png")
    return result


if __name__ == "__main__":
    main()
