"""Shared command-line plumbing: `--config` files with `--config.a.b=v` overrides, parsed so
that every user mistake (unknown field, wrong type, bad value) becomes one line and exit 2."""

from __future__ import annotations

import ast
import difflib
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from maxent_jax import config as config_lib
from maxent_jax import config_check
from maxent_jax import flag_spelling
from maxent_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.py"


def define_config_flag(flag_values: flags.FlagValues, default: pathlib.Path = DEFAULT_CONFIG) -> None:
    config_flags.DEFINE_config_file(
        "config", str(default), "Config file (a Python file with get_config()).", flag_values=flag_values,
        lock_config=True,
    )


_PARSE_ERRORS = (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError)


def parse(define: Callable[[], flags.FlagValues], argv: Sequence[str]) -> tuple[flags.FlagValues, list[str]]:
    """Define the flags and parse argv; unknown flags or config fields, wrong types and unloadable
    config files all become UserError. (ml_collections reads `--config.*` overrides while the
    flag is being defined, so definition is inside the guard too.)"""
    check_overrides(argv)
    flag_values: flags.FlagValues | None = None
    try:
        flag_values = define()
        rest = flag_values(flag_spelling.normalize(argv, list(flag_values)))  # --num-samples = --num_samples
        config = flag_values.config
        if config is None:
            raise UserError("--config: the config file's get_config() returned None")
        config.to_dict()  # materialise the lazily loaded file so its errors surface here
    except UserError:
        raise
    except flags.UnrecognizedFlagError as err:
        raise UserError(_unknown_flag(err.flagname, flag_values)) from None
    except flags.Error as err:
        raise UserError(_one_line(err)) from None
    except (KeyError, AttributeError) as err:
        text = str(err.args[0] if err.args else err)
        found = re.search(r"'([A-Za-z0-9_]+)", text)
        key = found.group(1) if found else text
        hint = re.search(r'Did you mean "([^"]+)"', text)
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        field = named[0][len("--config."):] if named else key
        suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        raise UserError(f"unknown config field {field!r}{suggestion}; see docs/configuration.md for every field") from None
    except ImportError as err:
        raise UserError(f"the --config file could not import {err.name or err}: run from the repository root "
                        "(recipes import the configs package)") from None
    except OSError as err:
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        raise UserError(f"could not load --config={path}: {_one_line(err).rsplit(']', 1)[-1].strip()}") from None
    except _PARSE_ERRORS as err:
        raise UserError(f"bad --config or override: {_one_line(err)}") from None
    return flag_values, rest


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               tuple: "a tuple such as (1,-1,1) or ('a','b')"}


def check_overrides(argv: Sequence[str]) -> None:
    """Every `--config.a.b=v` names a real field and carries a value of its type; else one UserError.

    Checked against the base config (every recipe and configs/*.py starts from it), before
    ml_collections parses them, so the message names the flag, the value and what is valid.
    """
    base = config_lib.get_base_config()
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if not arg.startswith("--config."):
            continue
        name, has_value, text = arg[len("--config."):].partition("=")
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
            text, has_value = args[i + 1], True
        parts = name.split(".")
        if not all(_FIELD_NAME.fullmatch(p) for p in parts):
            hint = name.replace("-", "_")
            fix = f" (did you mean --config.{hint}?)" if all(_FIELD_NAME.fullmatch(p) for p in hint.split(".")) else ""
            raise UserError(f"flag --config.{name}: config field names use letters, digits and '_'{fix}")
        node: Any = base
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"flag --config.{name}: unknown config field{_closest(name, base)}; "
                                "see docs/configuration.md for every field")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise UserError(f"flag --config.{name}: {name!r} is a section, not a field; set one of its fields, "
                            f"e.g. --config.{name}.{next(iter(node[leaf].keys()))}=...")
        kind = node.get_type(leaf)
        if has_value and not _parses_as(kind, text):
            raise UserError(f"flag --config.{name}={text}: config field {name} takes {_TYPE_WORDS.get(kind, kind.__name__)}")


def _parses_as(kind: type, text: str) -> bool:
    if kind is str:
        return True
    if kind is bool:
        return text.lower() in ("true", "false", "t", "f", "1", "0")
    if kind is float:
        try:
            float(text)
            return True
        except ValueError:
            return False
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return False
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return True


def _all_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _all_fields(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _closest(name: str, base: ml_collections.ConfigDict) -> str:
    fields = _all_fields(base)
    # A known field name without or in the wrong section ('train.learning_rate'): every field of that
    # name (optim.learning_rate and lora.learning_rate); else the nearest miss.
    close = [f for f in fields if f.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
    if not close:
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    return f" (did you mean {' or '.join(f'--config.{f}' for f in close)}?)" if close else ""


def _unknown_flag(name: str, flag_values: flags.FlagValues | None) -> str:
    """An unknown flag, with the config field of that name when there is one (`--max_steps`)."""
    fields = [f for f in _all_fields(config_lib.get_base_config()) if f.rsplit(".", 1)[-1] == name]
    if fields:
        return f"unknown flag --{name}: config fields are set as --config.SECTION.FIELD, here --config.{fields[0]}=VALUE"
    known = ", ".join(f"--{n}" for n in sorted(flag_values) if n == flag_values[n].name and n not in _HIDDEN) \
        if flag_values is not None else ""
    return f"unknown flag --{name}" + (f"; the flags are {known} (and --config.SECTION.FIELD=VALUE)" if known else "")


def apply_overrides(config: ml_collections.ConfigDict, config_flag: Any) -> None:
    """Write the command line's `--config.a.b=v` values onto a config that did not come from the
    flag itself (a recipe, a run's own config.json): the flag applied them to its default only."""
    config_lib.set_fields(config, config_flags.get_override_values(config_flag))


def validated(config: ml_collections.ConfigDict, device_count: int | None = None) -> ml_collections.ConfigDict:
    config_check.validate(config, device_count)
    return config


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = str(text).strip()
    return " ".join(text.split()) or type(err).__name__


# absl's own flags, not ours to list.
_HIDDEN = ("help", "helpfull", "helpshort", "helpxml", "only_check_args", "pdb", "pdb_post_mortem", "run_with_pdb",
           "run_with_profiling", "profile_file", "use_cprofile_for_profiling", "logtostderr", "alsologtostderr",
           "log_dir", "verbosity", "v", "stderrthreshold", "showprefixforinfo", "logger_levels")


def help_requested(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpfull", "-help") for a in argv[1:])


def print_help(flag_values: flags.FlagValues, program: str, summary: str) -> None:
    """Usage, the summary and every flag with its default; config fields are listed in docs/configuration.md."""
    lines = [f"usage: python -m {program} [--config=configs/X.py] [--config.SECTION.FIELD=VALUE ...] [flags]", ""]
    lines += [summary.strip(), "", "flags:"]
    for name in sorted(flag_values):
        flag = flag_values[name]
        if name != flag.name or name in _HIDDEN:
            continue
        default = flag.default_as_str if name != "config" else str(DEFAULT_CONFIG.relative_to(REPO_ROOT))
        lines.append(f"  --{name}: {flag.help} (default: {default})")
    lines.append("  --config.SECTION.FIELD=VALUE: override one config field, e.g. --config.maxent.tau=0.1")
    print("\n".join(lines))
    sys.stdout.flush()
