"""Shared command-line plumbing: `--config` files with `--config.a.b=v` overrides, parsed so
that every user mistake (unknown field, wrong type, bad value) becomes one line and exit 2."""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from maxent_jax import config as config_lib
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
    try:
        flag_values = define()
        rest = flag_values(flag_spelling.normalize(argv, list(flag_values)))  # --num-samples = --num_samples
        config = flag_values.config
        if config is None:
            raise UserError("--config: the config file's get_config() returned None")
        config.to_dict()  # materialise the lazily loaded file so its errors surface here
    except UserError:
        raise
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


def validated(config: ml_collections.ConfigDict, device_count: int | None = None) -> ml_collections.ConfigDict:
    config_lib.validate(config, device_count)
    return config


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = str(text).strip()
    return " ".join(text.split()) or type(err).__name__


def help_requested(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpfull", "-help") for a in argv[1:])


def print_help(flag_values: flags.FlagValues, program: str, summary: str) -> None:
    """Usage, the summary and every flag with its default; config fields are listed in docs/configuration.md."""
    lines = [f"usage: python -m {program} [--config=configs/X.py] [--config.SECTION.FIELD=VALUE ...] [flags]", ""]
    lines += [summary.strip(), "", "flags:"]
    for name in sorted(flag_values):
        flag = flag_values[name]
        if name != flag.name or name in ("help", "helpfull", "helpshort", "helpxml", "only_check_args", "pdb",
                                         "pdb_post_mortem", "run_with_pdb", "run_with_profiling", "profile_file",
                                         "use_cprofile_for_profiling", "logtostderr", "alsologtostderr", "log_dir",
                                         "verbosity", "v", "stderrthreshold", "showprefixforinfo", "logger_levels"):
            continue
        default = flag.default_as_str if name != "config" else str(DEFAULT_CONFIG.relative_to(REPO_ROOT))
        lines.append(f"  --{name}: {flag.help} (default: {default})")
    lines.append("  --config.SECTION.FIELD=VALUE: override one config field, e.g. --config.maxent.tau=0.1")
    print("\n".join(lines))
    sys.stdout.flush()
