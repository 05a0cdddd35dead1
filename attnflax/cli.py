r"""The command line of ``attnflax.main`` and of every experiment script: one style.

* **absl flags**: ``--name=value`` (or ``--name value``); booleans ``--name`` /
  ``--noname``; lists of plain values comma-separated (``--eps=0,8/255``); values that
  may contain commas (paths, ``y,x`` pixels, compare's rows) are repeatable flags
  (``--workdir=runs/a --workdir=runs/b``).
* **A training config** is a config file, ``--config=path.py[:arg]`` (its
  ``get_config(arg)``), with ``--config.<dotted key>=<value>`` overrides, typed by the
  key's current value (``ml_collections.config_flags``; e.g. ``--config.num_epochs=3
  --config.model_kwargs.window='(5, 5)'``). In code, `load_config_file` reads such a file
  and `override` sets one dotted key (compare.py's rows and the tests use both).
* **``--out``** is always an output folder, created if missing (`define_out_flag`).
* **``--help``** prints the script's docstring and its flags and exits 0, before
  TensorFlow or JAX are imported: a script names its heavy modules with `lazy_import`,
  which imports them at their first use, after parsing.
* **A bad command line** is one line on stderr, ``<prog>: error: <reason>``, and exit
  status 2 (`USAGE_ERROR`); errors found later keep their own status (1).

This module imports only the standard library, absl, ``ml_collections`` and
`attnflax.configs` (which imports only ``ml_collections``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from attnflax.configs import defaults

USAGE_ERROR = 2
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
# Keys under which a dotted override may add a key the config does not have yet.
NEW_KEYS_UNDER = ("model_kwargs",)


# --------------------------------------------------------------------------- lazy imports


class _LazyModule(types.ModuleType):
    """A module imported at the first access to one of its attributes."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


def lazy_import(name: str) -> Any:
    """``jax = lazy_import("jax")``: the module `name`, imported when first used.

    The scripts name JAX, TensorFlow and the modules that import them this way at their
    top, so that parsing the command line (and ``--help``) imports neither.
    """
    if name in sys.modules:
        return sys.modules[name]
    return _LazyModule(name)


# --------------------------------------------------------------------------- config files


def load_config_file(spec: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file ``path`` (or ``get_config(arg)`` of
    ``path:arg``), the way ``--config=path[:arg]`` loads it.

    Raises:
      ValueError: The file does not exist or has no ``get_config``.
    """
    path, _, arg = os.fspath(spec).partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist.")
    name = "attnflax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot load config file {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config().")
    return module.get_config(arg) if arg else module.get_config()


def unknown_key(config: Any, dotted: str, new_keys_under: Sequence[str] = ()) -> str | None:
    """Why ``config.<dotted>`` names no key (None if it does).

    Keys directly under one of `new_keys_under` (e.g. ``model_kwargs.window``) count as
    existing: overrides may add them.

    Returns:
      ``"unknown config key 'data.batchsize': data has no key 'batchsize'; its keys are
      augment, batch_size, ..."`` or None.
    """
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            parent = ".".join(parts[:i])
            if i == len(parts) - 1 and parent in new_keys_under:
                return None
            where = parent or "the config"
            return (f"unknown config key {dotted!r}: {where} has no key {part!r}; its keys are "
                    f"{', '.join(sorted(keys)) or '(none)'}")
        node = node[part]
    return None


def override(config: ml_collections.ConfigDict, dotted: str, value: Any,
             new_keys_under: Sequence[str] = NEW_KEYS_UNDER) -> None:
    """``config.<dotted> = value`` (``override(c, 'data.batch_size', 32)``).

    The key must exist, except directly under `new_keys_under` (model arguments); the
    value must fit the key's type (an int for a float key is converted, as
    ``ml_collections`` does). A duration set in one unit (``num_epochs``, ...) unsets its
    other units (`attnflax.configs.defaults.set_duration`), as ``--config.x=y`` does.

    Raises:
      ValueError: An unknown key (the keys that exist at that level are listed) or a
        value of the wrong type.
    """
    problem = unknown_key(config, dotted, new_keys_under)
    if problem:
        raise ValueError(problem + ".")
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    try:
        setattr(node, leaf, value)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot set config.{dotted}={value!r}: {e}") from None
    if not parents:  # A duration set in one unit forgets its others.
        defaults.set_duration(config, leaf, value)


def parse_value(text: str) -> Any:
    """A Python literal (``3``, ``1e-3``, ``(5, 5)``, ``'global'``), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --------------------------------------------------------------------------- flags


def define_config_flag(flag_values: flags.FlagValues, *, argv: Sequence[str] | None = None,
                       default: str | None = None,
                       help_string: str = "Training config file, path.py or path.py:arg "
                                          "(experiments/configs/*.py); override its keys with "
                                          "--config.<key>=<value>.") -> None:
    """Defines ``--config`` (a config file) and its ``--config.<key>=<value>`` overrides.

    Args:
      flag_values: Where to define it.
      argv: The command line whose ``--config.<key>`` flags are the overrides (default
        ``sys.argv``).
      default: A config file used when ``--config`` is not given (loaded while parsing).
      help_string: The flag's help.
    """
    config_flags.DEFINE_config_file("config", default, help_string, lock_config=True,
                                    flag_values=flag_values, sys_argv=argv)


def config_overrides(flag_values: flags.FlagValues) -> dict[str, Any]:
    """``{dotted key: parsed value}`` of the ``--config.<key>=<value>`` flags given."""
    return dict(config_flags.get_override_values(flag_values["config"]))


def define_out_flag(flag_values: flags.FlagValues, contents: str, default: str | None = None,
                    default_text: str | None = None) -> None:
    """Defines ``--out``: the output folder (created if missing), the same for every script.

    Args:
      flag_values: Where to define it.
      contents: What the script writes there, for the help.
      default: The default folder; None when it depends on other flags (`default_text`
        says how, e.g. ``<workdir>/prune``).
      default_text: The default as the help states it.
    """
    said = f" Default: {default_text}." if default is None and default_text else ""
    flags.DEFINE_string("out", default, f"Output folder (created if missing): {contents}.{said}",
                        flag_values=flag_values)


def define_checkpoint_flags(flag_values: flags.FlagValues, several: bool = False) -> None:
    """Defines ``--workdir`` (required; repeatable if `several`), ``--step`` and ``--best``:
    which trained model a script reads (`attnflax.restore.load_trained`'s rule)."""
    if several:
        flags.DEFINE_multi_string("workdir", None, "A training workdir (repeat the flag for "
                                  "several models)", flag_values=flag_values, required=True)
    else:
        flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).",
                            flag_values=flag_values, required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest, whose test "
                         "accuracy results.json reports).", flag_values=flag_values)
    flags.DEFINE_boolean("best", False, "Read the best checkpoint by eval accuracy instead of "
                         "the latest.", flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["step", "best"], lambda v: v["step"] is None or not v["best"],
        "pass --step or --best, not both.", flag_values=flag_values)


class _TypedListParser(flags.ListParser):
    """A comma-separated list whose items are converted by `item` (and checked by `check`)."""

    def __init__(self, item: Callable[[str], Any], check: Callable[[Any], str | None] | None):
        super().__init__()
        self._item, self._check = item, check

    def parse(self, argument: Any) -> list[Any]:
        values = []
        for text in super().parse(argument):
            try:
                value = self._item(text) if isinstance(text, str) else text
            except ValueError as e:
                raise ValueError(f"{text!r} is not a valid item: {e}") from None
            problem = self._check(value) if self._check else None
            if problem:
                raise ValueError(problem)
            values.append(value)
        return values

    def flag_type(self) -> str:
        return f"comma-separated list of {getattr(self._item, '__name__', 'values')}"


def define_list(name: str, default: Iterable[Any] | None, help_string: str,
                flag_values: flags.FlagValues, item: Callable[[str], Any] = str,
                check: Callable[[Any], str | None] | None = None) -> None:
    """Defines ``--name=a,b,c``: a comma-separated list, each item ``item(text)``.

    Args:
      name, default, help_string, flag_values: As for ``flags.DEFINE_list``.
      item: Converts one item (``int``, ``float``, or a function raising ValueError).
      check: Returns why an item is refused (None: accepted); a refusal is a usage error.
    """
    flags.DEFINE(_TypedListParser(item, check), name,
                 None if default is None else list(default), help_string,
                 flag_values=flag_values, serializer=flags.CsvListSerializer(","))


def _help_text(flag_values: flags.FlagValues, doc: str, prog: str, full: bool = False) -> str:
    """`doc` and the flags; absl's own (logging, debugging) only if `full`."""
    lines = [f"usage: {prog} [flags]", "", doc.strip(), "", "flags:"]
    own = {f.name for module, defined in flag_values.flags_by_module_dict().items()
           if full or not module.startswith("absl.") for f in defined}
    for name in sorted(own - {"help", "helpshort", "helpfull", "helpxml"}):
        flag = flag_values[name]
        lines.append(f"  --{'[no]' if flag.boolean else ''}{name}: {flag.help}")
        if flag.default is not None:
            lines.append(f"    (default: {flag.default_as_str})")
    lines.append("  --help: show this help and exit" + ("" if full else
                                                         " (--helpfull: absl's flags too)"))
    return "\n".join(lines) + "\n"


def usage_error(prog: str, message: str) -> NoReturn:
    """Prints ``<prog>: error: <message>`` (one line) to stderr; exits with `USAGE_ERROR`."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def _wants_help(argv: Sequence[str]) -> str | None:
    """The help flag in `argv` (before a ``--``), if any."""
    for arg in argv:
        if arg == "--":
            return None
        if arg.split("=", 1)[0] in HELP_FLAGS:
            return arg.split("=", 1)[0]
    return None


def _config_spec(argv: Sequence[str], flag_values: flags.FlagValues) -> str | None:
    """The ``--config`` file of `argv` (or the flag's default)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    flag = flag_values["config"] if "config" in flag_values else None
    return getattr(flag, "config_filename", None) if flag is not None else None


def _unknown_keys_error(prog: str, argv: Sequence[str], spec: str | None,
                        error: BaseException) -> NoReturn:
    """The `usage_error` for ``--config.<key>`` flags that name no key of config `spec`
    (``ml_collections`` reports the first as a bare KeyError or AttributeError)."""
    problems = []
    try:
        config = load_config_file(spec) if spec else None
    except Exception:  # noqa: BLE001 - fall back to ml_collections' own message
        config = None
    if config is not None:
        for arg in argv:
            if arg.startswith("--config."):
                problem = unknown_key(config, arg[len("--config."):].split("=", 1)[0])
                problems += [problem] if problem else []
    usage_error(prog, "; ".join(problems) or f"unknown config key {error}")


def parse_into(flag_values: flags.FlagValues, argv: Sequence[str], *, doc: str,
               prog: str) -> list[str]:
    """Parses `argv` (program name first) into `flag_values`, the same way for every script.

    ``--help`` prints `doc` and the flags to stdout and exits 0. A bad flag, a missing
    required flag, a missing config file or an unknown ``--config.<key>`` is a
    `usage_error`: one line, exit status 2.

    Returns:
      The program name and the positional arguments.
    """
    wanted = _wants_help(argv[1:])
    if wanted:
        sys.stdout.write(_help_text(flag_values, doc, prog, full=wanted == "--helpfull"))
        sys.exit(0)
    if "config" in flag_values:
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if spec is not None and not os.path.isfile(spec.partition(":")[0]):
            usage_error(prog, f"--config={spec}: config file {spec.partition(':')[0]!r} "
                              "does not exist.")
    try:
        rest = flag_values(list(argv))
    except flags.Error as e:
        usage_error(prog, str(e))
    except (AttributeError, KeyError) as e:  # how ml_collections reports unknown keys
        _unknown_keys_error(prog, argv, _config_spec(argv, flag_values), e)
    config = flag_values["config"].value if "config" in flag_values else None
    for arg in argv:  # A duration set in one unit forgets its others, in command-line order.
        key = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else ""
        if config is not None and key in config and config[key] is not None:
            defaults.set_duration(config, key, config[key])
    return rest


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], *,
          doc: str, prog: str, config: bool = False, config_default: str | None = None,
          positional: str | None = None) -> types.SimpleNamespace:
    """The flags of one script run, parsed into a fresh ``FlagValues`` (so a script's
    ``main(argv)`` may be called many times in one process, as the tests do).

    Args:
      argv: The arguments without the program name (None: ``sys.argv[1:]``).
      define: Defines the script's flags in the ``FlagValues`` it is given.
      doc: The script's docstring, printed by ``--help``.
      prog: The script's name, for the help and the error line.
      config: Whether the script takes ``--config`` (`define_config_flag`); the result
        then also holds ``config_file`` (``path[:arg]``) and ``config_overrides``
        (`config_overrides`).
      config_default: The config file used when ``--config`` is not given.
      positional: The attribute that collects the positional arguments (``'images'``);
        None: the script takes none, and any is a `usage_error`.

    Returns:
      The flag values by name (and the positional arguments under `positional`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flag_values = flags.FlagValues()
    define(flag_values)
    # The default config file is loaded while the flag is defined only if overrides need
    # it; else after parsing (a --help or a bad flag does not load it).
    late_default = None
    if config and (_wants_help(argv) or not any(a.startswith("--config") for a in argv)):
        late_default, config_default = config_default, None
    if config:
        try:  # With a default file, ml_collections reads the overrides right here.
            define_config_flag(flag_values, argv=[prog, *argv], default=config_default)
        except (AttributeError, KeyError) as e:
            _unknown_keys_error(prog, argv, _config_spec(argv, flag_values) or config_default,
                                e)
    rest = parse_into(flag_values, [prog, *argv], doc=doc, prog=prog)[1:]
    if rest and positional is None:
        usage_error(prog, f"unexpected arguments: {' '.join(rest)}")
    args = types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values
                                    if "." not in name})
    if positional is not None:
        setattr(args, positional, rest)
    if config and late_default is not None:
        args.config, args.config_file, args.config_overrides = (
            load_config_file(late_default), late_default, {})
    elif config:
        args.config_file = config_flags.get_config_filename(flag_values["config"])
        args.config_overrides = config_overrides(flag_values)
    return args
