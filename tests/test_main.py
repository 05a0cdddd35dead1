"""Tests for the command line ``python -m attnflax.main``: flags and user errors.

Its normal path (train, SIGTERM, resume, exit status) runs in test_checkpoint.py's child
processes, and ``experiments/evaluate.py`` in test_checkpoint.py too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import types

import pytest
from absl import flags
from train_testutil import REPO

from attnflax import main

DIGITS = "--config=experiments/configs/digits.py"


def _parse(argv, monkeypatch):
    """Parses `argv` with main's flags into a fresh FlagValues (as `app.run` would)."""
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv
    monkeypatch.chdir(REPO)
    main.parse_flags(argv, flag_values)
    return flag_values


def test_config_overrides(monkeypatch):
    fv = _parse(["main", DIGITS, "--workdir=/tmp/x", "--config.num_epochs=3",
                 "--config.data.batch_size=32", "--config.model_kwargs.attention=global",
                 "--config.model_kwargs.features=(8,16)"], monkeypatch)
    assert fv.config.num_epochs == 3.0 and isinstance(fv.config.num_epochs, float)
    assert fv.config.data.batch_size == 32
    assert fv.config.model_kwargs.attention == "global"
    assert fv.config.model_kwargs.features == (8, 16)
    assert fv.workdir == "/tmp/x"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.not_a_key=1", "the config has no key 'not_a_key'"),
        ("--config.data.batchsize=8", "data has no key 'batchsize'; its keys are augment, "
                                      "batch_size"),
        ("--config.num_epochs=abc", "could not convert string to float: 'abc'"),
        ("--config.data.batch_size=1.5", "invalid literal for int()"),
    ],
)
def test_bad_config_flags_are_rejected(flag, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["main", DIGITS, "--workdir=/tmp/x", flag], monkeypatch)
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fv = _parse(["main", DIGITS, f"--workdir={blocker}/run"], monkeypatch)
    assert main.main(["main"], fv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot write to workdir") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_attention_implementation_is_a_config_key(monkeypatch):
    """``--config.attention_implementation`` picks the kernel of the model's attention
    layers without changing the model's identity (its checkpoint metadata)."""
    from attnflax import train

    fv = _parse(["main", DIGITS, "--workdir=/tmp/x", "--config.attention_implementation=xla"],
                monkeypatch)
    assert fv.config.attention_implementation == "xla"
    assert train.create_model(fv.config, 10).attention_implementation == "xla"
    fv.config.model = "cnn"
    fv.config.model_kwargs = {"features": (32, 64), "hidden": 64}
    with pytest.raises(train.ConfigError, match="model 'cnn' has no attention layers"):
        train.create_model(fv.config, 10)


def _error_raised_in(where):
    """exc_info of an error raised by code whose file is ``.../where`` (as if a library's)."""
    try:
        exec(compile("raise ValueError('RESOURCE_EXHAUSTED: No space left on device')",
                     os.sep + where.replace("/", os.sep), "exec"))
    except ValueError:
        return sys.exc_info()


LIBRARY_ERRORS = [  # (where the error was raised, dropped unless --verbose)
    ("site-packages/orbax/checkpoint/serialization.py", True),
    ("site-packages/tensorstore/__init__.py", True),
    ("lib/python3.11/asyncio/base_events.py", True),
    ("home/user/attnflax_user/model.py", False),  # not the libraries': kept
]


@pytest.mark.parametrize("where, dropped", LIBRARY_ERRORS)
def test_library_error_logs_are_dropped_unless_verbose(where, dropped):
    # asyncio's "Task exception was never retrieved", logged from asyncio's own module
    # whenever the collector reaches a failed Orbax task (CI saw it; timing-dependent).
    record = logging.LogRecord("asyncio", logging.ERROR, "/home/user/x.py", 1771,
                               "Task exception was never retrieved", (), _error_raised_in(where))
    assert main._QuietLibraryErrors().filter(record) is not dropped
    warning = logging.LogRecord("absl", logging.WARNING, "/x/orbax/y.py", 1, "w", (), None)
    assert main._QuietLibraryErrors().filter(warning)  # the libraries' warnings are kept


@pytest.mark.parametrize("where, dropped", LIBRARY_ERRORS)
def test_library_unraisables_and_thread_errors_are_dropped(where, dropped, monkeypatch):
    """"Exception ignored in: <coroutine _read_array_index_and_device_put>" when a failed
    Orbax read is collected (CI saw it after a damaged checkpoint was skipped)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(("unraisable", u)))
    monkeypatch.setattr(threading, "excepthook", lambda a: seen.append(("thread", a)))
    _, error, tb = _error_raised_in(where)
    event = types.SimpleNamespace(exc_type=ValueError, exc_value=error, exc_traceback=tb,
                                  err_msg=None, object=None, thread=None)
    with main._quiet_library_noise():
        sys.unraisablehook(event)
        threading.excepthook(event)
    assert [kind for kind, _ in seen] == ([] if dropped else ["unraisable", "thread"])
    sys.unraisablehook(event)  # restored on exit
    assert len(seen) == (1 if dropped else 3)
