"""Tests of `attnflax.cli`: one command-line style for attnflax.main and every script.

The scripts' own behaviour runs in test_experiments.py (and the files it names); here:
``--help`` answers at once without JAX or TensorFlow, a bad flag is one line and status 2,
``--out`` is a folder everywhere, and the one config loader and dotted override.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from train_testutil import CONFIGS, REPO, SCRIPTS, load_script, subprocess_env

from attnflax import cli, main

# Runs every script's main (and attnflax.main) in this one process, as `python script.py
# ARGS` would, and reports per script: the exit status, the seconds, stdout, stderr and
# which heavy modules had been imported by then.
_RUN_ALL = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, time
    results = {}
    args = sys.argv[1:]
    for name in %r + ["attnflax.main"]:
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if name == "attnflax.main":
                    sys.argv = ["attnflax.main", *args]
                    runpy.run_module(name, run_name="__main__")
                else:
                    sys.argv = [f"experiments/{name}.py", *args]
                    runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code
        results[name] = {"code": code, "seconds": time.perf_counter() - start,
                         "out": out.getvalue(), "err": err.getvalue(),
                         "heavy": [m for m in ("jax", "tensorflow", "matplotlib", "orbax")
                                   if m in sys.modules]}
    print(json.dumps(results))
""") % (list(SCRIPTS),)


def _run_all(*args: str) -> dict:
    start_process = subprocess.run([sys.executable, "-c", _RUN_ALL, *args], cwd=REPO,
                                   env=subprocess_env(1), capture_output=True, text=True,
                                   timeout=120)
    assert start_process.returncode == 0, start_process.stderr[-3000:]
    return json.loads(start_process.stdout.strip().splitlines()[-1])


def test_every_script_answers_help_at_once():
    """``--help`` exits 0 with the docstring and the flags, in well under 3 s, and imports
    neither JAX nor TensorFlow (they load after parsing)."""
    for name, r in _run_all("--help").items():
        assert r["code"] == 0, (name, r["err"])
        assert not r["heavy"], (name, r["heavy"])
        assert r["seconds"] < 3, (name, r["seconds"])
        assert r["out"].startswith(f"usage: {name if '.' in name else name + '.py'} [flags]")
        doc = load_script(name).__doc__ if name in SCRIPTS else main.__doc__
        assert doc.strip().splitlines()[0] in r["out"], name
        assert "\nflags:\n" in r["out"] and "  --help: show this help" in r["out"]


def test_a_bad_flag_is_one_line_and_status_2():
    for name, r in _run_all("--no_such_flag=1").items():
        prog = name if "." in name else f"{name}.py"
        assert r["code"] == cli.USAGE_ERROR, (name, r["err"])
        assert r["err"].strip() == (f"{prog}: error: Unknown command line flag "
                                    "'no_such_flag'"), name
        assert not r["heavy"], (name, r["heavy"])


def _flags_of(name: str) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    load_script(name).define_flags(flag_values)
    return flag_values


def test_out_is_an_output_folder_in_every_script():
    """Every script that writes files takes ``--out``, and it is always a folder
    (`cli.define_out_flag`); the files the scripts write into it are checked where each
    script is tested."""
    with_out = {name for name in SCRIPTS if "out" in _flags_of(name)}
    assert with_out == set(SCRIPTS) - {"model_summary"}  # it only prints
    for name in with_out:
        assert _flags_of(name)["out"].help.startswith("Output folder (created if missing): ")


def test_scripts_that_read_a_workdir_share_the_step_flags():
    for name in ("evaluate", "predict", "prune", "robustness", "visualize"):
        flag_values = _flags_of(name)
        assert {"workdir", "step", "best"} <= set(flag_values), name
        assert flag_values["step"].help.startswith("Checkpoint step (default: the latest")


def test_parse_gives_values_positionals_help_and_one_line_errors(capsys):
    def define(flag_values):
        flags.DEFINE_integer("n", 3, "A count.", lower_bound=1, flag_values=flag_values)
        cli.define_list("levels", [0.5], "Levels.", flag_values, item=float,
                        check=lambda v: None if v >= 0 else f"levels must be >= 0; got {v}.")
        cli.define_out_flag(flag_values, "x.json", default="runs/x")

    args = cli.parse(["--n=4", "a.png", "--levels=1,2.5", "b.png"], define,
                     doc="Does x.", prog="x.py", positional="files")
    assert (args.n, args.levels, args.out, args.files) == (4, [1.0, 2.5], "runs/x",
                                                          ["a.png", "b.png"])
    for argv, message in ((["--n=0"], "flag --n=0: 0 is not a positive integer"),
                          (["--n=4", "a.png"], "unexpected arguments: a.png"),
                          (["--levels=1,-1"], "levels must be >= 0; got -1.0."),
                          (["--levels=1,x"], "'x' is not a valid item")):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse(argv, define, doc="Does x.", prog="x.py")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("x.py: error: ") and message in err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--n=0", "--help"], define, doc="Does x.", prog="x.py")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Does x." in out and "--levels: Levels." in out and "(default: '3')" in out


def test_config_flag_overrides_are_typed_and_unknown_keys_listed(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    digits = "--config=experiments/configs/digits.py"
    args = cli.parse([digits, "--config.num_epochs=3", "--config.model_kwargs.window=(5,5)"],
                     lambda fv: None, doc="", prog="x.py", config=True)
    assert args.config.num_epochs == 3.0 and args.config.model_kwargs.window == (5, 5)
    assert args.config_overrides == {"num_epochs": 3.0, "model_kwargs.window": (5, 5)}
    assert args.config_file == "experiments/configs/digits.py"
    for argv, message in (
            ([digits, "--config.data.batchsize=8"],
             "unknown config key 'data.batchsize': data has no key 'batchsize'; its keys are "
             "augment, batch_size"),
            (["--config=nope.py"], "config file 'nope.py' does not exist"),
            ([digits, "--config.num_epochs=abc"], "could not convert string to float")):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse(argv, lambda fv: None, doc="", prog="x.py", config=True)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # A default config file takes overrides without --config, and is checked the same way.
    args = cli.parse(["--config.seed=3"], lambda fv: None, doc="", prog="x.py", config=True,
                     config_default=str(CONFIGS / "digits.py"))
    assert args.config.seed == 3 and args.config_file == str(CONFIGS / "digits.py")
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--config.sed=3"], lambda fv: None, doc="", prog="x.py", config=True,
                  config_default=str(CONFIGS / "digits.py"))
    assert exit_.value.code == cli.USAGE_ERROR
    assert "unknown config key 'sed'" in capsys.readouterr().err


def test_load_config_file_and_override():
    config = cli.load_config_file(f"{CONFIGS / 'digits.py'}:cnn")
    assert config.model == "cnn"
    assert cli.load_config_file(CONFIGS / "digits.py").model == "attention_cnn"
    with pytest.raises(ValueError, match="does not exist"):
        cli.load_config_file(CONFIGS / "nope.py")

    cli.override(config, "data.batch_size", 32)
    cli.override(config, "learning_rate", 1)  # an int for a float key, as ml_collections does
    cli.override(config, "model_kwargs.window", (5, 5))  # new keys: model arguments only
    assert (config.data.batch_size, config.learning_rate) == (32, 1.0)
    assert config.model_kwargs.window == (5, 5)
    with pytest.raises(ValueError, match="unknown config key 'data.batchsize': data has no "
                                         "key 'batchsize'; its keys are augment, batch_size"):
        cli.override(config, "data.batchsize", 8)
    with pytest.raises(ValueError, match="unknown config key 'optimiser'"):
        cli.override(config, "optimiser", "sgd")
    with pytest.raises(ValueError, match="cannot set config.data.batch_size='x'"):
        cli.override(config, "data.batch_size", "x")
    assert cli.unknown_key(config, "data.augment.flip") is None
    assert cli.parse_value("(5, 5)") == (5, 5) and cli.parse_value("global") == "global"


def test_lazy_import_imports_at_first_use():
    module = cli.lazy_import("attnflax_test_lazy_module_that_is_not_there")
    assert isinstance(module, type(ml_collections))  # a module object, not yet imported
    with pytest.raises(ModuleNotFoundError):
        module.anything  # noqa: B018 - the first use imports it
    assert cli.lazy_import("json") is json  # already imported: the module itself
