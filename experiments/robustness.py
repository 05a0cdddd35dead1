r"""Accuracy under input corruptions and adversarial attacks, for one or several models.

Usage::

    python experiments/robustness.py --workdir=runs/digits
    python experiments/robustness.py --workdir=runs/compare/runs/cnn/seed0 \
        --workdir=runs/compare/runs/attention_local/seed0 --out=runs/robustness
    python experiments/robustness.py --workdir=runs/digits --eps=0,4/255,8/255 --attacks=pgd \
        --pgd_steps=20 --noise=none --blur= --contrast=0.2  # none / empty list: skip it

Everything happens in **pixel space** ``x`` in ``[0, 1]`` (`attnflax.analysis.robustness`): each
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
Every accuracy is the trainer's masked evaluation of the perturbed batches
(`attnflax.restore.evaluate`); each model is its workdir's latest checkpoint (``--best``,
``--step``: `attnflax.restore`'s rule). Writes ``robustness.md``, ``robustness.json``
and ``robustness.png`` (accuracy vs ε per attack, and per corruption) into ``--out`` (a
folder, default ``<workdir>/robustness`` for one model, ``runs/robustness`` for several).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from attnflax import cli  # noqa: E402
from attnflax.report import markdown_table, write_json  # noqa: E402

# Imported at their first use, after the flags are parsed.
jax = cli.lazy_import("jax")
data = cli.lazy_import("attnflax.data")
restore = cli.lazy_import("attnflax.restore")
viz = cli.lazy_import("attnflax.viz")
rb = cli.lazy_import("attnflax.analysis.robustness")

DEFAULT_EPS = ("0", "2/255", "4/255", "8/255", "16/255", "32/255")
# --flag -> attnflax.analysis.robustness.CORRUPTIONS name.
CORRUPTION_FLAGS = {"noise": "gaussian_noise", "blur": "gaussian_blur", "contrast": "contrast"}


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags (the defaults that live in `attnflax.analysis.robustness` are
    filled in by `parse_args`, which imports it after parsing)."""
    cli.define_checkpoint_flags(flag_values, several=True)
    flags.DEFINE_list("eps", list(DEFAULT_EPS), "L-inf budgets in [0, 1] pixel units, e.g. "
                      "0.03 or 8/255.", flag_values=flag_values)
    flags.DEFINE_list("attacks", None, "Attacks: fgsm, pgd ('none' or --attacks=: none; "
                      "default: every one of attnflax.analysis.robustness.ATTACKS).",
                      flag_values=flag_values)
    flags.DEFINE_integer("pgd_steps", 10, "PGD steps.", lower_bound=1, flag_values=flag_values)
    for flag, name in CORRUPTION_FLAGS.items():
        flags.DEFINE_list(flag, None, f"{name} levels ('--{flag}=none' or --{flag}=: skip it; "
                          "default: attnflax.analysis.robustness.DEFAULT_CORRUPTION_LEVELS"
                          f"['{name}']).", flag_values=flag_values)
    flags.DEFINE_integer("num_examples", None, "Evaluate the first N eval examples only "
                         "(default all).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Noise and PGD start seed.", flag_values=flag_values)
    cli.define_out_flag(flag_values, "robustness.md, robustness.json and robustness.png",
                        default_text="<workdir>/robustness for one model, runs/robustness "
                                     "for several")


def _levels(flag: str, texts: Sequence[str]) -> list[float]:
    """``--noise=0.1,0.2`` -> ``[0.1, 0.2]``; ``none`` (alone) or nothing -> ``[]``.

    Raises:
      ValueError: Not numbers >= 0, or ``none`` beside levels.
    """
    texts = [t.strip() for t in texts if t.strip()]
    if any(t.lower() == "none" for t in texts):
        if len(texts) > 1:
            raise ValueError(f"--{flag}=none cannot be combined with levels; got {texts}.")
        return []
    levels = []
    for text in texts:
        try:
            level = float(text)
        except ValueError:
            raise ValueError(f"--{flag}: a level must be a number or 'none'; got "
                             f"{text!r}.") from None
        if not (np.isfinite(level) and level >= 0):
            raise ValueError(f"--{flag} levels must be >= 0; got {level:g}.")
        levels.append(level)
    return levels


def parse_args(argv: Sequence[str] | None) -> Any:
    """The flags, with the defaults of `attnflax.analysis.robustness` filled in;
    ``eps_values`` holds the checked ε of ``eps``. A bad value is a one-line usage error."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="robustness.py")
    try:
        for flag, name in CORRUPTION_FLAGS.items():
            texts = getattr(args, flag)
            setattr(args, flag, list(rb.DEFAULT_CORRUPTION_LEVELS[name]) if texts is None
                    else _levels(flag, texts))
        attacks = list(rb.ATTACKS) if args.attacks is None else [
            a.strip() for a in args.attacks if a.strip()]
        if "none" in attacks and len(attacks) > 1:
            raise ValueError(f"--attacks=none cannot be combined with attacks; got {attacks}.")
        unknown = [a for a in attacks if a not in (*rb.ATTACKS, "none")]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(rb.ATTACKS)}.")
        args.attacks = [a for a in attacks if a != "none"]
        args.eps_values = [rb.parse_epsilon(e) for e in args.eps]
    except ValueError as e:
        cli.usage_error("robustness.py", str(e))
    return args


def eps_label(text: str, value: float) -> str:
    return text if "/" not in text else f"{text} ({value:.3f})"


def conditions(args: Any) -> list[tuple[str, str, float, str]]:
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
    trained: restore.Trained, args: Any
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
        models = [restore.load_trained(w, args.step, best=args.best) for w in args.workdir]
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
