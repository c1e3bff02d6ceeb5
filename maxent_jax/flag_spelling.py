"""Both spellings of a multi-word flag: `--num_samples` or `--num-samples`, `--token-file` or `--token_file`.

The command-line tools come in two families: absl-based (`train`, `evaluate`, whose flags are
spelled like config fields, with underscores) and argparse-based (`serve`, `bench`, `plot`,
hyphens as most CLIs). A user moving between them types the other family's spelling, so every
tool accepts both: `normalize` rewrites a flag given in the other spelling to the defined one
before parsing. `--config.*` overrides are left alone: they name config fields, whose own
spelling is checked by the config.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Sequence


def normalize(argv: Sequence[str], defined: Iterable[str]) -> list[str]:
    """argv with each `--name[=value]` whose name differs from a defined flag only in `-` vs `_`
    spelled as defined; everything else (values, positionals, `--config.*`, after `--`) as given."""
    canonical = {name.replace("-", "_"): name for name in defined}
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if not arg.startswith("--") or arg.startswith("--config."):
            continue
        name, sep, value = arg[2:].partition("=")
        wanted = canonical.get(name.replace("-", "_"))
        if wanted is not None and wanted != name:
            out[i] = f"--{wanted}{sep}{value}"
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that also takes the underscore spelling of each hyphenated option."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = sys.argv[1:] if args is None else list(args)
        names = [option[2:] for action in self._actions for option in action.option_strings if option.startswith("--")]
        return super().parse_known_args(normalize(args, names), namespace)
